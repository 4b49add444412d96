import os
import sys
from pathlib import Path

# Tests import their shared helpers one way, `from helpers.<module> import ...` (tests/helpers/; the
# modules there are also run as scripts by the multi-process tests).
sys.path.insert(0, str(Path(__file__).parent))

# Tests never touch the network: a stray hub call would otherwise wait for a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
