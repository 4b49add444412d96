"""A checkpoint folder (any layout) -> a complete transformers JetMoe directory: config.json, sharded
safetensors with `model.safetensors.index.json` in bf16 or fp32, generation_config.json and the tokenizer
(the one the run trained with, stored in the checkpoint, or `--tokenizer`). Written to a staging folder
and renamed into place, so an interrupted export never leaves a half directory under OUT_DIR."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger
from jetmoe.training.checkpoint import folders
from jetmoe.training.checkpoint.contents import MODEL_INDEX, OPTIMIZER_INDEX
from jetmoe.training.checkpoint.parts import PartReader
from jetmoe.training.checkpoint.rank_files import MASTER
from jetmoe.training.validate import check_writable

logger = get_logger(__name__)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _layer_order(name: str):
    parts = name.split(".")
    layer = int(parts[2]) if name.startswith("model.layers.") else (-1 if "embed" in name else 10**9)
    return layer, name


def find_checkpoint(source: str | Path, log=logger.info) -> Path:
    """The verified step folder that SOURCE names: a step folder, a checkpoints folder or a run directory
    (their newest intact checkpoint). Errors speak of the export's CHECKPOINT argument."""
    path = Path(source).expanduser()
    usage = "pass a step folder (checkpoints/step_XXXXXXXX), a checkpoints folder or a run directory"
    if not path.exists():
        raise JetMoEError(f"checkpoint {source}: no such file or folder; {usage}")
    if not path.is_dir():
        raise JetMoEError(f"checkpoint {source} is a file, not a checkpoint folder; {usage}")
    if not (path / folders.MANIFEST).exists() and not folders.list_checkpoints(path) \
            and folders.list_checkpoints(path / "checkpoints"):
        path = path / "checkpoints"  # a run directory
    if (path / folders.MANIFEST).exists() or folders.list_checkpoints(path):
        try:
            return folders.resolve(str(path), None, log=log)
        except JetMoEError as e:
            if not str(e).startswith("checkpoint.resume="):  # that wording is for training's resume key
                raise
            raise JetMoEError(f"checkpoint {source}: every checkpoint there is damaged (see above); {usage}") from None
    raise JetMoEError(f"checkpoint {source}: no committed checkpoint there (no {folders.MANIFEST}); {usage}")


def _tokenizer_files(reader, config, tokenizer_spec, log) -> dict[str, dict]:
    """tokenizer files + generation_config.json: from --tokenizer, else from the checkpoint."""
    from jetmoe.training.checkpoint import hf_files

    if tokenizer_spec:
        from jetmoe.data.tokenizer import load_tokenizer

        tok = load_tokenizer(str(tokenizer_spec), lambda s: Path(s).expanduser())
        if tok.vocab_size > config.vocab_size:
            raise JetMoEError(f"--tokenizer {tokenizer_spec} has {tok.vocab_size} tokens but the model has "
                              f"{config.vocab_size}; pass the tokenizer the run trained with")
        for key, value in hf_files.token_ids(tok).items():
            setattr(config, key, value)
        files = hf_files.tokenizer_files(tok, config.max_position_embeddings)
    else:
        files = {name: reader.json(name) for name in hf_files.TOKENIZER_FILES if reader.has(name)}
        if not files:
            log(f"warning: {reader.folder} holds no tokenizer (written before tokenizers were saved); "
                "pass --tokenizer PATH to include one")
    gen = hf_files.GENERATION_CONFIG
    if reader.has(gen) and not tokenizer_spec:
        files[gen] = reader.json(gen)
    else:
        files[gen] = hf_files.generation_config({k: getattr(config, k) for k in
                                                 ("bos_token_id", "eos_token_id", "pad_token_id")})
    return files


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bf16", max_shard_size="5GB",
              log=logger.info, tokenizer: str | Path | None = None) -> Path:
    from jetmoe.model.hf_io import config_to_hf_dict, parse_size, read_config, shard_by_bytes

    if dtype not in DTYPES:
        raise JetMoEError(f"--dtype {dtype} is unknown; use bf16 or fp32")
    torch_dtype = DTYPES[dtype]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise JetMoEError(f"output {out} is an existing file; choose a new output folder")
    if out.exists() and any(out.iterdir()):
        raise JetMoEError(f"{out} exists and is not empty; choose a new output folder")
    check_writable(out, what="output folder", fix="choose another OUT_DIR")  # before reading the checkpoint
    folder = find_checkpoint(checkpoint, log=log)
    config = read_config(folder)
    reader = PartReader(folder, verify="size")  # find_checkpoint verified it
    step = int(reader.manifest["step"])
    weight_map = reader.json(MODEL_INDEX)["weight_map"]
    masters = reader.json(OPTIMIZER_INDEX).get(MASTER, {}) if reader.has(OPTIMIZER_INDEX) else {}

    def weight(name):  # the fp32 master when a bf16 run stored one, else the weight file's tensor
        if name not in masters:
            return reader.tensor(weight_map[name], name)
        shape = masters[name]["shape"]
        return reader.flat(masters[name]["parts"], name, 0, int(torch.Size(shape).numel())).reshape(shape)
    names = sorted(weight_map, key=_layer_order)
    extra_files = _tokenizer_files(reader, config, tokenizer, log)

    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    numel = {n: int(torch.Size(reader.shape(weight_map[n], n)).numel()) for n in names}
    shards = shard_by_bytes(((n, itemsize * numel[n]) for n in names), parse_size(max_shard_size))

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        index, total = {}, 0
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: weight(n).to(torch_dtype).contiguous() for n in shard}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(staging / file), metadata={"format": "pt"})
            index.update({n: file for n in shard})
            del tensors
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2, sort_keys=True) + "\n")
        (staging / "config.json").write_text(json.dumps(config_to_hf_dict(config, torch_dtype), indent=2) + "\n")
        for name, obj in extra_files.items():
            (staging / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise JetMoEError(f"could not write {out}: {e.strerror or e}; free space or choose another folder") from None
    finally:
        reader.close()
    log(f"exported {folder} (step {step}) to {out}: {sum(numel.values()):,} parameters, {dtype}, "
        f"{len(shards)} shard(s), {total / 2**20:.1f} MiB"
        f"{', with tokenizer' if 'tokenizer.json' in extra_files else ', no tokenizer'}")
    return out
