"""Shared set-up and fixtures.

Tests import their shared helpers one way, `from helpers.<module> import ...` (tests/helpers/; the modules there
are also run as scripts by the multi-process tests). Every test that starts a process (a launcher, a script, a
worker pool, a compiler) is marked `slow`; `make test-fast` runs the others.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests never touch the network: a stray hub call would otherwise wait for a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """These models are tiny: one thread avoids OpenMP hand-offs that cost seconds on a busy 2-core machine.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_config():
    """The typed, checked run config that train/pretrain.py would run with these overrides:
    `run_config("train.lr=1e-3", ...)`; `needs=(...)` limits the checked sections, as plan.py does."""
    from jetmoe.training.compose import load

    return lambda *overrides, needs=None: load(list(overrides), needs)
