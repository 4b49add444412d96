"""Read and write transformers' JetMoe directory layout: config.json + safetensors (one file, or shards
with `model.safetensors.index.json`). Parameter names and shapes are transformers' own."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jetmoe.errors import JetMoEError
from jetmoe.model.config import JetMoEConfig

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TRAINING_ONLY_KEYS = {"gradient_checkpointing"}
# Keys transformers writes into every config.json that describe no part of the network.
BOOKKEEPING_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "num_attention_heads", "head_dim", "rope_theta", "rope_scaling", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "is_encoder_decoder", "is_decoder",
    "tie_encoder_decoder", "add_cross_attention", "chunk_size_feed_forward", "problem_type", "id2label",
    "label2id", "tokenizer_class", "auto_map", "_attn_implementation_autoset",
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---------------------------------------------------------------- config

def config_from_hf_dict(d: dict) -> JetMoEConfig:
    d = dict(d)
    if d.get("model_type", "jetmoe") != "jetmoe":
        raise JetMoEError(f"config.json: model_type={d['model_type']!r} is not a JetMoE model ('jetmoe')")
    if d.get("rope_scaling") is not None:
        raise JetMoEError("config.json: rope_scaling is not supported; remove it (default RoPE only)")
    if "rope_theta" in d and d.get("rope_parameters") is None:  # older transformers layout
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": float(d["rope_theta"])}
    extras = {k: d.pop(k) for k in list(d) if k in BOOKKEEPING_KEYS}
    config = JetMoEConfig.from_dict(d)
    heads = extras.get("num_attention_heads")
    if heads is not None and heads != config.num_attention_heads:
        raise JetMoEError(
            f"config.json: num_attention_heads={heads} but num_key_value_heads * num_experts_per_tok = "
            f"{config.num_attention_heads}; fix one of them")
    return config


def config_to_hf_dict(config: JetMoEConfig, dtype: torch.dtype) -> dict:
    d = {k: v for k, v in config.to_dict().items() if k not in TRAINING_ONLY_KEYS}
    d["rope_parameters"] = config.rope
    d.update(architectures=["JetMoeForCausalLM"], model_type="jetmoe",
             num_attention_heads=config.num_attention_heads, dtype=DTYPE_NAMES.get(dtype, str(dtype)))
    return dict(sorted(d.items()))


def read_config(path: str | os.PathLike) -> JetMoEConfig:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise JetMoEError(f"{path}: no {CONFIG_NAME}; point to a directory written by save_pretrained or transformers")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise JetMoEError(f"{file}: not valid JSON ({e}); fix or re-export the file") from None
    return config_from_hf_dict(d)


# ---------------------------------------------------------------- weights

def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)\s*", size, re.IGNORECASE)
    if not m:
        raise JetMoEError(f"max_shard_size={size!r}: write it like 5GB, 500MB or a byte count")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMG".index(unit[0] if unit[0] in "KMG" else "B"))


def shard_by_bytes(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose byte sizes add up to at most `max_bytes` each (a larger tensor sits
    alone). The one sharding rule of HF directories, checkpoints and exports."""
    shards, size = [[]], 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards if shards[-1] else []


def save_pretrained(model, path, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # transformers re-ties it from the embedding
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        tensors[name] = t
    dtype = dtype or next(iter(tensors.values())).dtype
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        old.unlink(missing_ok=True)  # stale shards of an earlier save would mix with these
    shards = [{n: tensors[n] for n in names} for names in shard_by_bytes(
        ((n, t.numel() * t.element_size()) for n, t in tensors.items()), parse_size(max_shard_size))]
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata=metadata)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (path / CONFIG_NAME).write_text(json.dumps(config_to_hf_dict(model.config, dtype), indent=2) + "\n")


def weight_files(path: Path) -> dict[str, Path]:
    """Map of tensor name -> file holding it."""
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        return {name: path / file for name, file in index["weight_map"].items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(str(path / SINGLE_FILE), "pt") as f:
            return {name: path / SINGLE_FILE for name in f.keys()}
    raise JetMoEError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are supported")


def read_weights(path: Path, names: dict[str, torch.Size], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    where = weight_files(path)
    missing = [n for n in names if n not in where]
    if missing:
        raise JetMoEError(f"{path}: weights lack {missing[0]} (expected shape {tuple(names[missing[0]])})"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; the config does not "
                          "match this checkpoint")
    unexpected = [n for n in where if n not in names and n != "lm_head.weight"]
    if unexpected:
        raise JetMoEError(f"{path}: unexpected weight {unexpected[0]}; the config does not match this checkpoint")
    out = {}
    for file in sorted(set(where[n] for n in names)):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name not in names:
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(names[name]):
                    raise JetMoEError(f"{file.name}: weight {name} has shape {shape}, the config needs "
                                      f"{tuple(names[name])}; fix config.json or the checkpoint")
                t = f.get_tensor(name)
                out[name] = t.to(dtype) if dtype is not None else t
    return out


def load_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu"):
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):
        model = cls(config)
    expected = {n: p.shape for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state = read_weights(path, expected, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.to(device)
