"""The files that make a folder a complete transformers model besides the weights: `config.json` (bos/eos
ids taken from the tokenizer), `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` and
`generation_config.json`. Every checkpoint holds them (a step folder loads with AutoTokenizer and
AutoModelForCausalLM), and train/export_hf.py carries them over.

All are JSON objects, so the checkpoint writer stores them like its other small files (in the manifest).
The tokenizer is written as a generic `PreTrainedTokenizerFast` over the `tokenizers` JSON, which is how
transformers loads any fast tokenizer; no transformers import is needed to write it.
"""

from __future__ import annotations

import json

import torch

from jetmoe.data.tokenizer import SPECIAL_KEYS, TextTokenizer

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def token_ids(tokenizer: TextTokenizer) -> dict[str, int | None]:
    return {"bos_token_id": tokenizer.token_id("bos_token"), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.token_id("pad_token")}


def tokenizer_files(tokenizer: TextTokenizer, model_max_length: int) -> dict[str, dict]:
    tokenizer_json = json.loads(tokenizer.backend.to_str())
    special = {k: tokenizer.special[k] for k in SPECIAL_KEYS if k in tokenizer.special}
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special") if k in t}
        for t in tokenizer_json.get("added_tokens", [])
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        **special,
    }
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config, "special_tokens_map.json": special}


def generation_config(ids: dict[str, int | None]) -> dict:
    """Greedy by default; padding with EOS when the tokenizer has no pad token (batched generation)."""
    pad = ids.get("pad_token_id")
    return {"bos_token_id": ids.get("bos_token_id"), "eos_token_id": ids.get("eos_token_id"),
            "pad_token_id": pad if pad is not None else ids.get("eos_token_id")}


def model_files(model_config, tokenizer: TextTokenizer | None, dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """config.json + generation_config.json, and the tokenizer's files when there is one."""
    from jetmoe.model.hf_io import config_to_hf_dict

    config = config_to_hf_dict(model_config, dtype)
    files = {}
    if tokenizer is not None:
        config.update(token_ids(tokenizer))
        files.update(tokenizer_files(tokenizer, model_config.max_position_embeddings))
    files[CONFIG] = config
    files[GENERATION_CONFIG] = generation_config(config)
    return files
