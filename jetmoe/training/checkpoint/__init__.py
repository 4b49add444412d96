"""Checkpoints: safetensors by transformers' names, a manifest written last, an atomic `latest` pointer.

Writing and committing (no engine): `store`. Finding, verifying and pruning folders: `folders`; reading: `parts`.
Contents (any module + optimizer, plain torch or DeepSpeed ZeRO-1, any pp/dp/ep): `contents`. Trainer
hooks: `hooks`. DeepSpeed-free users (tests, export) import the submodules directly.
"""

from jetmoe.training.checkpoint.hooks import CheckpointManager, ModelParts
from jetmoe.training.checkpoint.contents import TrainingState, read_into, save
from jetmoe.training.checkpoint.folders import list_checkpoints, prune, read_latest, resolve, verify
from jetmoe.training.checkpoint.store import CheckpointWriter, LocalComm

__all__ = [
    "CheckpointManager", "ModelParts", "TrainingState", "read_into", "save", "CheckpointWriter", "LocalComm",
    "list_checkpoints", "prune", "read_latest", "resolve", "verify",
]
