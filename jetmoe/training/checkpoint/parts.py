"""Reading only the bytes a rank needs from a committed checkpoint, and verifying what it reads.

A rank resuming in any layout needs: the whole weights of its stage (every data-parallel rank keeps a full
working copy), only its expert rows, and only the flat range of each optimizer tensor that its ZeRO-1
partition holds. Weights are whole tensors (transformers needs them so); optimizer state is stored as
flat fragments listed in optimizer/index.json. `PartReader.flat(...)` assembles any flat element range
of a tensor from the parts that cover it, reading byte ranges with os.pread (safetensors' layout: an
8-byte header length, a JSON header, then each tensor's raw bytes).

Verification, only for what this rank reads: `size` compares each file's size with the manifest (catches
truncation); `full` also checks the sha256 of every block it reads against the manifest's per-block hashes
(about 64 blocks per file), then serves the bytes from the verified blocks, so no byte is read twice.
`bytes_read` counts every byte read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint.folders import load_manifest

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
VERIFY_MODES = ("full", "size")


class PartReader:
    def __init__(self, folder: str | Path, verify: str = "full") -> None:
        if verify not in VERIFY_MODES:
            raise JetMoEError(f"checkpoint.verify={verify} is unknown; use full or size")
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.verify = verify
        self.bytes_read = 0
        self._cache: dict[str, bytes] = {}  # verify=full: whole files, hashed once
        self._checked: set[str] = set()
        self._headers: dict[str, tuple[int, dict]] = {}

    # ------------------------------------------------------------------------------------- raw bytes
    def _check(self, file: str) -> None:
        if file in self._checked:
            return
        meta = self.manifest["files"].get(file)
        path = self.folder / file
        if meta is None:
            raise JetMoEError(f"{path} is not listed in the manifest; the checkpoint is damaged")
        try:
            size = path.stat().st_size
        except OSError:
            raise JetMoEError(f"{path} is missing") from None
        if size != meta["size"]:
            raise JetMoEError(f"{path} is truncated or altered ({size} bytes, manifest says {meta['size']})")
        if self.verify == "full" and not meta.get("blocks"):  # a manifest without block hashes: whole file
            data = path.read_bytes()
            self.bytes_read += len(data)
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise JetMoEError(f"{path} is altered (sha256 differs from the manifest)")
            self._cache[file] = data
        self._checked.add(file)

    def _pread(self, file: str, offset: int, n: int) -> bytes:
        fd = os.open(self.folder / file, os.O_RDONLY)
        try:
            data = os.pread(fd, n, offset)
        finally:
            os.close(fd)
        self.bytes_read += len(data)
        if len(data) != n:
            raise JetMoEError(f"{self.folder / file} is truncated")
        return data

    def _block(self, file: str, i: int) -> bytes:
        key = f"{file}#{i}"
        if key not in self._cache:
            meta = self.manifest["files"][file]
            block = meta["block"]
            data = self._pread(file, i * block, min(block, meta["size"] - i * block))
            if hashlib.sha256(data).hexdigest() != meta["blocks"][i]:
                raise JetMoEError(f"{self.folder / file} is altered (sha256 of bytes {i * block}.. differs "
                                  "from the manifest)")
            self._cache[key] = data
        return self._cache[key]

    def _bytes(self, file: str, offset: int, n: int) -> memoryview:
        self._check(file)
        if file in self._cache:
            return memoryview(self._cache[file])[offset : offset + n]
        if self.verify == "size":
            return memoryview(self._pread(file, offset, n))
        block = self.manifest["files"][file]["block"]
        first, last = offset // block, (offset + n - 1) // block
        if first == last:
            return memoryview(self._block(file, first))[offset - first * block : offset - first * block + n]
        data = b"".join(self._block(file, i) for i in range(first, last + 1))
        return memoryview(data)[offset - first * block : offset - first * block + n]

    def _header(self, file: str) -> tuple[int, dict]:
        if file not in self._headers:
            try:
                (n,) = struct.unpack("<Q", self._bytes(file, 0, 8))
                if 8 + n > self.manifest["files"][file]["size"]:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(bytes(self._bytes(file, 8, n)))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
            except (ValueError, struct.error) as e:  # verify=size reads unhashed bytes: garbage is damage too
                raise JetMoEError(f"{self.folder / file} has an unreadable safetensors header ({e}); the "
                                  "checkpoint is damaged") from None
            self._headers[file] = (8 + n, header)
        return self._headers[file]

    # ---------------------------------------------------------------------------------------- tensors
    def info(self, file: str, key: str) -> dict:
        _, header = self._header(file)
        if key not in header:
            raise JetMoEError(f"{self.folder / file} has no tensor {key}; the checkpoint is damaged")
        return header[key]

    def shape(self, file: str, key: str) -> list[int]:
        return list(self.info(file, key)["shape"])

    def tensor(self, file: str, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Flat elements [lo, hi) of a stored tensor (all of it, shaped, when lo=0 and hi=None)."""
        start, _ = self._header(file)
        info = self.info(file, key)
        dtype = DTYPES[info["dtype"]]
        item = torch.empty((), dtype=dtype).element_size()
        begin, end = info["data_offsets"]
        numel = (end - begin) // item
        whole = lo == 0 and hi is None
        hi = numel if hi is None else hi
        if not 0 <= lo <= hi <= numel:
            raise JetMoEError(f"{self.folder / file}: {key} has {numel} elements, asked for [{lo}, {hi})")
        if hi == lo:
            return torch.empty(0, dtype=dtype)
        raw = self._bytes(file, start + begin + lo * item, (hi - lo) * item)
        t = torch.frombuffer(bytearray(raw), dtype=dtype)
        return t.reshape(info["shape"]) if whole else t

    def flat(self, parts: list, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of a tensor's flattened whole, assembled from parts [[file, start, numel], ...]
        (each part holds elements [start, start+numel) under `key`)."""
        pieces, covered = [], lo
        for file, start, numel in sorted(parts, key=lambda p: p[1]):
            a, b = max(lo, start), min(hi, start + numel)
            if a >= b:
                continue
            if a != covered:
                break
            pieces.append(self.tensor(file, key, a - start, b - start).reshape(-1))
            covered = b
        if covered != hi:
            raise JetMoEError(f"{self.folder}: the parts of {key} do not cover elements [{lo}, {hi}); "
                              "the checkpoint is damaged")
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def json(self, name: str):
        """A JSON file of the checkpoint, verified like every other read; unreadable JSON is damage too."""
        self._check(name)
        try:
            return json.loads(bytes(self._bytes(name, 0, self.manifest["files"][name]["size"])))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise JetMoEError(f"{self.folder / name} is not valid JSON ({e}); the checkpoint is damaged") from None

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def close(self) -> None:
        self._cache.clear()
        self._headers.clear()
