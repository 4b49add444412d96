"""Per-step metrics on global rank 0: metrics.jsonl (flushed each step), wandb, console and progress bar.

Throughput accounting: FLOPs per token = 6 x active matmul parameters + 6 x layers x attention width x
seq_len (forward + backward, attention scores and values, causal attention counted as half of full attention:
Megatron's convention); the planner's count (jetmoe.plan.throughput). MFU = achieved / peak per device.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from jetmoe.log import get_logger, set_progress_bar
from jetmoe.plan.hardware import device_peak_tflops
from jetmoe.plan.params import ModelShape, count_params
from jetmoe.plan.throughput import flops_per_token as plan_flops_per_token
from jetmoe.training import wandb_run
from jetmoe.training.jsonl_cut import cut_after_step
from jetmoe.training.sampling import format_samples
from jetmoe.training.tensorboard_log import TensorBoardLogger
from jetmoe.training.wandb_run import start_wandb

logger = get_logger(__name__)
SAMPLES_FILE = "samples.jsonl"

# Every row of metrics.jsonl carries at least these: the run directory's contract (README, 'Run directory').
REQUIRED_KEYS = ("step", "lm_loss", "aux_loss", "balance_loss", "z_loss", "loss", "lr", "grad_norm", "tokens",
                 "tokens_per_sec")


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token, counted as the planner counts them (jetmoe.plan.throughput)."""
    shape = ModelShape.from_config(config)
    dense, attention = plan_flops_per_token(shape, count_params(shape), seq_len)
    return float(dense + attention)


def peak_tflops(configured: float | None, cuda: bool, bf16: bool) -> float | None:
    """Per-device peak for MFU: cluster.peak_tflops when set, else the table's entry for this device's exact name
    (jetmoe.plan.hardware); None on a CPU or an unknown part (no MFU then)."""
    if configured:
        return float(configured)
    if not cuda:
        return None
    peak = device_peak_tflops(torch.cuda.get_device_name())
    if peak is None:
        return None
    return peak if bf16 else peak / 2  # dense tf32 is about half of bf16 on these parts


def rss_mib() -> float:
    """Resident memory of this process now."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_memory_mib(cuda: bool) -> dict:
    """Peak memory of this process (rank 0's row), and the largest peak over all ranks."""
    import torch.distributed as dist

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_dev = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    out = {"peak_rss_mib": round(peak_rss, 1)}
    if cuda:
        out["peak_mem_mib"] = round(peak_dev, 1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.tensor([peak_rss, peak_dev], dtype=torch.float64,
                            device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        out["peak_rss_mib_max"] = round(float(both[0]), 1)
        if cuda:
            out["peak_mem_mib_max"] = round(float(both[1]), 1)
    return out


class MetricsLogger:
    """Writes rows on rank 0 only; other ranks hold an inert instance. `logging` is the logging section,
    `record` the resolved config that wandb attaches to the run."""

    def __init__(self, run_dir: Path, logging, enabled: bool, max_steps: int, log_every: int = 1,
                 record: dict | None = None):
        self.enabled = enabled
        self.settings = logging
        self.max_steps, self.log_every = max_steps, log_every
        self.run_dir = Path(run_dir)
        self.file = None
        self.write_error: str | None = None  # the first write error under the run directory (a full disk)
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / "metrics.jsonl", "a")
        self.wandb = start_wandb(logging.wandb, self.run_dir, record or {})
        self.tensorboard = TensorBoardLogger(self.run_dir) if logging.tensorboard else None
        if logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
            set_progress_bar(self.bar)  # console lines go above the bar

    def set_start(self, step: int) -> None:
        """A resumed run continues at `step`: rows of later steps (written before a crash) are dropped."""
        if not self.enabled:
            return
        self.file.close()
        for name in ("metrics.jsonl", SAMPLES_FILE):
            cut_after_step(self.run_dir / name, step)  # one truncate: a kill cannot empty the file
        self.file = open(self.run_dir / "metrics.jsonl", "a")
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._write(lambda: (self.file.write(json.dumps(row) + "\n"), self.file.flush()), "metrics.jsonl")
        scalars = _flatten(row)
        if self.wandb is not None:
            self.wandb.log(scalars)
        if self.tensorboard is not None:
            self.tensorboard.log(scalars)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {row.get('lm_loss', float('nan')):.3f}", refresh=False)
        step = row["step"]
        last = step == self.max_steps
        if self.settings.console and (step % max(1, self.log_every) == 0 or step == 1 or last
                                      or "eval_loss" in row or row.get("skipped")):
            logger.info(format_row(row))

    def alert(self, title: str, text: str) -> None:
        """Something a person should look at: a console warning and a wandb alert (sent when online; offline it is
        kept in the run file for `wandb sync`). The caller records it in the step's row too (`alerts`)."""
        if not self.enabled:
            return
        logger.warning(f"{title}: {text}")
        if self.wandb is not None:
            wandb_run.alert(self.wandb, title, text)

    def log_samples(self, records: list[dict] | None) -> None:
        """Text samples of one step (jetmoe.training.sampling): samples.jsonl, console, wandb, TensorBoard."""
        if not self.enabled or not records:
            return

        def append():
            with open(self.run_dir / SAMPLES_FILE, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))

        self._write(append, SAMPLES_FILE)
        if self.settings.console:
            logger.info(format_samples(records))
        if self.wandb is not None:
            wandb_run.log_samples(self.wandb, records)
        if self.tensorboard is not None:
            self.tensorboard.log_samples(records)

    def _write(self, write, name: str) -> None:
        """Run `write`; the first OSError is kept in write_error (jetmoe.training.write_errors then stops the run
        after a checkpoint) and later writes are skipped rather than raising mid-step."""
        if self.write_error is not None:
            return
        try:
            write()
        except OSError as e:
            self.write_error = f"{name}: {e.strerror or e}"

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            set_progress_bar(None)
            self.bar.close()
        if self.file is not None:
            try:
                self.file.close()  # closed even when its last flush fails (that error is reported once, here)
            except OSError as e:
                if self.write_error is None:  # else the run already stopped with one line saying so
                    self.write_error = f"metrics.jsonl: {e.strerror or e}"
                    logger.error(f"error: could not write {self.run_dir / 'metrics.jsonl'}: {e.strerror or e}")
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, list):
            if v and isinstance(v[0], (list, str)):
                continue  # per-expert shares, router names: metrics.jsonl (and plot.py) only
            for i, x in enumerate(v):
                out[f"{key}/layer_{i}"] = x
        elif v is not None:
            out[key] = v
    return out


def format_row(row: dict) -> str:
    parts = [f"step {row['step']:>6}"]
    for key, fmt in (("lm_loss", "lm {:.4f}"), ("aux_loss", "aux {:.4f}"), ("balance_loss", "bal {:.3f}"),
                     ("z_loss", "z {:.3f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
                     ("tokens_per_sec", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}"), ("eval_loss", "eval {:.4f}")):
        v = row.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v) and key == "mfu"):
            parts.append(fmt.format(v))
    if row.get("skipped"):
        parts.append(f"SKIPPED ({row.get('skip_reason', 'non-finite')})")
    return " | ".join(parts)
