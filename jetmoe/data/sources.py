"""Text sources as `datasets` datasets with one column, "text": builtin corpus, local files, hub datasets.

`make_source` checks what it can cheaply (paths, globs, extensions) right away, so bad input fails within
seconds; loading happens only when the token cache has to be built.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from jetmoe.data.config import DataConfig
from jetmoe.paths import resolve_user_path
from jetmoe.errors import JetMoEError

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")  # datasets (fsspec) decompresses these by extension
TOKENIZER_TRAIN_CHARS = 200_000_000  # the builtin BPE sees at most this much text of a user's corpus


def file_format(path: Path) -> Optional[str]:
    """The `datasets` builder for a file name, looking through a compression suffix (.jsonl.zst -> json)."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


@dataclass
class Source:
    key: str  # changes whenever the text may have changed
    description: str
    load: Callable[[], object]  # -> datasets.Dataset | IterableDataset with a "text" column, or a list of texts
    size_bytes: Optional[int] = None

    def texts(self, max_chars: int = TOKENIZER_TRAIN_CHARS) -> Iterator[str]:
        seen = 0
        data = self.load()
        batches = ([data[i:i + 1000] for i in range(0, len(data), 1000)] if isinstance(data, list)
                   else (batch["text"] for batch in data.iter(batch_size=1000)))
        for batch in batches:
            for text in batch:
                if text:
                    yield text
                    seen += len(text)
            if seen >= max_chars:
                return


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_source(cfg: DataConfig, hf_cache: Path) -> Source:
    if cfg.name == "builtin":
        return _builtin_source()
    if cfg.name == "files":
        return _files_source(cfg, hf_cache)
    return _hub_source(cfg, hf_cache)


def _builtin_source() -> Source:
    from jetmoe.data import builtin_corpus

    docs: list[str] = []

    def load():  # a plain list: the built-in corpus needs no `datasets` (the GPU check's machine lacks it)
        if not docs:
            docs.extend(builtin_corpus.iter_documents())
        return docs

    return Source(key=builtin_corpus.corpus_key(), description="builtin corpus (Python stdlib docstrings)", load=load)


# ---- local files -----------------------------------------------------------------------------------

def expand_files(path) -> list[Path]:
    specs = list(path) if isinstance(path, (list, tuple)) or type(path).__name__ == "ListConfig" else [path]
    files: list[Path] = []
    for spec in specs:
        spec = str(spec)
        p = resolve_user_path(spec)
        if any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise JetMoEError(f"data.path glob {spec!r} matches no file (looked under {p.parent})")
            files.extend(matches)
        elif p.is_dir():
            inside = sorted(q for q in p.iterdir() if q.is_file() and file_format(q))
            if not inside:
                raise JetMoEError(f"data.path directory {p} holds no {'/'.join(FORMATS)} file")
            files.extend(inside)
        elif p.is_file():
            files.append(p)
        else:
            raise JetMoEError(f"data.path: no such file {p}")
    for f in files:
        if file_format(f) is None:
            raise JetMoEError(f"data.path: {f} has unknown extension {''.join(f.suffixes)!r}; use "
                              f"{', '.join(FORMATS)} (optionally compressed: {', '.join(COMPRESSIONS)})")
    return files


def _files_source(cfg: DataConfig, hf_cache: Path) -> Source:
    files = expand_files(cfg.path)
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = _digest("files-v1", stats, cfg.text_field, cfg.txt_sample_by)
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(file_format(f), []).append(f)

    def load():
        import datasets

        parts = [_load_group(fmt, fs, cfg, hf_cache) for fmt, fs in groups.items()]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    desc = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]} ...)"
    return Source(key=key, description=desc, load=load, size_bytes=sum(s[1] for s in stats))


def _load_group(fmt: str, files: list[Path], cfg: DataConfig, hf_cache: Path):
    import datasets

    kwargs = {"sample_by": cfg.txt_sample_by} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", streaming=cfg.streaming,
                                   cache_dir=str(hf_cache), **kwargs)
        if fmt != "text":
            ds = _select_text(ds, cfg.text_field, files)
    except JetMoEError:
        raise
    except Exception as e:
        if all(f.stat().st_size < 1 << 20 and not f.read_bytes().strip() for f in files):
            raise JetMoEError(f"{files[0]}{' ...' if len(files) > 1 else ''} is empty (no documents)") from None
        if fmt == "json":
            _raise_json_error(files)
        raise JetMoEError(f"cannot read {files[0]}{' ...' if len(files) > 1 else ''}: {_first_line(e)}") from None
    return ds


def _select_text(ds, field: str, files: list[Path]):
    columns = ds.column_names
    if columns is None:  # a stream whose schema is only known after the first row
        first = next(iter(ds), None)
        columns = list(first) if first is not None else [field]
    if field not in columns:
        raise JetMoEError(
            f"{files[0]}{' ...' if len(files) > 1 else ''} has no field {field!r}; fields: {', '.join(columns)} "
            f"(set data.text_field)"
        )
    _check_text_column(ds, field, files)
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def _check_text_column(ds, field: str, files: list[Path]) -> None:
    """The text field must hold strings (null or empty rows are skipped and counted later). A column that
    also holds other values names the first file and row that does."""
    feature = (ds.features or {}).get(field)
    if feature is None or getattr(feature, "dtype", None) in ("string", "large_string"):
        return
    found = _first_non_text(files, field)
    if found is not None:
        path, row, value = found
        raise JetMoEError(f"{path}:{row}: data.text_field {field!r} holds {type(value).__name__} {repr(value)[:40]}, "
                          "not text; fix that row or set data.text_field to a text column")
    raise JetMoEError(f"{files[0]}{' ...' if len(files) > 1 else ''}: data.text_field {field!r} is {feature}, not text; "
                      "set data.text_field to a text column")


def _first_non_text(files: list[Path], field: str):
    """(file, line, value) of the first JSON-lines row whose `field` is neither text nor null, or None."""
    import fsspec

    for path in files:
        if file_format(path) != "json":
            continue
        with fsspec.open(str(path), "rt", compression="infer", encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    value = json.loads(line).get(field) if line.strip() else None
                except (ValueError, AttributeError):
                    continue
                if value is not None and not isinstance(value, str):
                    return path, lineno, value
    return None


def _raise_json_error(files: list[Path]) -> None:
    """datasets' JSON errors do not say where; find the first bad line ourselves."""
    for f in files:
        if f.suffix == ".json":
            try:
                json.loads(f.read_text(encoding="utf-8"))
                continue
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # "Extra data" means JSON lines in a .json file, checked below
                    raise JetMoEError(f"{f}:{e.lineno}: malformed JSON ({e.msg})") from None
        with open(f, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JetMoEError(f"{f}:{lineno}: malformed JSON line ({e.msg})") from None
                if not isinstance(row, dict):
                    raise JetMoEError(f"{f}:{lineno}: a JSON line must be an object, got {type(row).__name__}")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---- hub datasets (or a local dataset directory) -------------------------------------------------------

def _hub_source(cfg: DataConfig, hf_cache: Path) -> Source:
    local = resolve_user_path(cfg.path)
    if local.exists():
        stats = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in local.rglob("*") if p.is_file())
        name, ident = str(local), stats
    else:
        name, ident = str(cfg.path), None
    key = _digest("hub-v1", name, ident, cfg.hub_config, cfg.split, cfg.text_field)

    def load():
        import datasets

        try:
            ds = datasets.load_dataset(name, cfg.hub_config, split=cfg.split, streaming=cfg.streaming,
                                       cache_dir=str(hf_cache))
        except Exception as e:
            raise JetMoEError(
                f"dataset {name!r} (config {cfg.hub_config}, split {cfg.split}) could not be loaded: {_first_line(e)}; "
                f"check the name, or the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
            ) from None
        return _select_text(ds, cfg.text_field, [Path(name)])

    return Source(key=key, description=f"dataset {name} [{cfg.split}]", load=load)
