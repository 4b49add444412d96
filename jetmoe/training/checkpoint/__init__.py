"""Checkpoints: safetensors by transformers' names, a manifest written last, an atomic `latest` pointer.

Storage (no engine): `store` (writer, commit, verify, resolve, prune). Contents (any module + optimizer,
plain torch or DeepSpeed ZeRO-1, any pp/dp/ep): `contents`. Trainer hooks: `hooks`.
"""

from jetmoe.training.checkpoint.hooks import CheckpointManager
from jetmoe.training.checkpoint.contents import Place, TrainingState, read_into, save
from jetmoe.training.checkpoint.store import (
    CheckpointReader,
    CheckpointWriter,
    LocalComm,
    list_checkpoints,
    prune,
    read_latest,
    resolve,
    verify,
)

__all__ = [
    "CheckpointManager", "Place", "TrainingState", "read_into", "save", "CheckpointReader", "CheckpointWriter", "LocalComm",
    "list_checkpoints", "prune", "read_latest", "resolve", "verify",
]
