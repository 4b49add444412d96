"""A checkpoint folder (any layout) -> a transformers JetMoe directory: config.json + sharded safetensors
with `model.safetensors.index.json`, in bf16 or fp32. Weights only; written to a staging folder and
renamed into place, so an interrupted export never leaves a half directory under OUT_DIR."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint.folders import CheckpointReader, resolve
from jetmoe.training.checkpoint.contents import MODEL_INDEX

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _layer_order(name: str):
    parts = name.split(".")
    layer = int(parts[2]) if name.startswith("model.layers.") else (-1 if "embed" in name else 10**9)
    return layer, name


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bf16", max_shard_size="5GB",
              log=print) -> Path:
    from jetmoe.model.hf_io import config_to_hf_dict, parse_size, read_config, shard_by_bytes

    if dtype not in DTYPES:
        raise JetMoEError(f"--dtype {dtype} is unknown; use bf16 or fp32")
    torch_dtype = DTYPES[dtype]
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise JetMoEError(f"{out} exists and is not empty; choose a new output folder")
    folder = resolve(str(checkpoint), None, log=log)
    config = read_config(folder)
    reader = CheckpointReader(folder)
    step = reader.step
    weight_map = reader.json(MODEL_INDEX)["weight_map"]
    names = sorted(weight_map, key=_layer_order)

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
            tensors = {n: reader.tensor(weight_map[n], n).to(torch_dtype).contiguous() for n in shard}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(staging / file), metadata={"format": "pt"})
            index.update({n: file for n in shard})
            del tensors
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2, sort_keys=True) + "\n")
        (staging / "config.json").write_text(json.dumps(config_to_hf_dict(config, torch_dtype), indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise JetMoEError(f"could not write {out}: {e.strerror or e}; free space or choose another folder") from None
    finally:
        reader.close()
    params = sum(numel.values())
    log(f"exported {folder} (step {step}) to {out}: {params:,} parameters, {dtype}, "
        f"{len(shards)} shard(s), {total / 2**20:.1f} MiB")
    return out
