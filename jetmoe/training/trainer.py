"""The training loop: one `train_batch` of the PipelineEngine per optimizer step, then the tracker's
router losses reduced over pp and dp, then one metrics row from global rank 0.

Checkpoints (jetmoe.training.checkpoint.CheckpointManager): `.resume() -> int` (steps already done) once
before the loop, `.after_step(step)` at each step boundary (`step` = optimizer steps done, the data
loader already advanced past them), `.should_stop() -> bool` after it (a stop signal arrived), and
`.finish(step)` at the end.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import CheckpointManager
from jetmoe.training.config import data_config, model_config
from jetmoe.training.engine import (EngineParts, build_engine, grad_accumulation, init_distributed, layout_for,
                                   precision, use_cuda)
from jetmoe.training.metrics import MetricsLogger, flops_per_token, peak_memory_mib, peak_tflops, rss_mib
from jetmoe.training.watchdog import Watchdog


def _pipe_batches(micro_batches: list[dict], device) -> list:
    """DeepSpeed's pipeline wants (inputs, labels) per micro-batch; only tensors cross stages."""
    return [((mb["input_ids"].to(device), mb["position_ids"].to(device)), mb["labels"].to(device))
            for mb in micro_batches]


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.step = 0  # optimizer steps done (skipped ones included)
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self.tokens = 0

    # -------------------------------------------------------------------------------------- set-up
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.rank, self.world = init_distributed(cfg)
        self.watchdog = Watchdog.for_job(self.rank, cfg.train.stall_warn_s)  # peer failures, stalls
        self.is_rank0 = self.rank == 0
        self.run_dir = Path(_agree_on(str(self.run_dir)))
        self.model_config = model_config(cfg)
        self.cuda = use_cuda(cfg)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.layout = layout_for(cfg, self.model_config, self.rank, self.world)
        grad_accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size, self.layout.dp)
        # Data before the engine: a bad path or tokenizer fails within seconds.
        self.data = self._build_data()
        self.parts: EngineParts = build_engine(cfg, self.model_config, self.layout)
        self.engine = self.parts.engine
        self.mem_static_mib = rss_mib()  # rank 0's resident memory with model, optimizer and data ready
        self.loader = self.data.train_loader(cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                             self.layout.dp_rank, self.layout.dp)
        self.seq_len = cfg.data.seq_len
        self.tokens_per_step = cfg.train.global_batch_size * self.seq_len
        self.flops_per_step = flops_per_token(self.model_config, self.seq_len) * self.tokens_per_step
        self.peak = peak_tflops(cfg, self.cuda, precision(cfg) == "bf16")
        if self.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.metrics = MetricsLogger(self.run_dir, cfg, self.is_rank0, cfg.train.max_steps)
        self.metrics.print(f"layout {self.layout.describe()} | blocks per stage {self.parts.module.block_counts} "
                           f"| micro-batches per step {self.parts.grad_accumulation} | precision {precision(cfg)} "
                           f"| run dir {self.run_dir}")
        self.checkpoint = CheckpointManager(self)
        return self

    def _build_data(self):
        from jetmoe.data import build_data

        mc = self.model_config
        return build_data(data_config(self.cfg), mc.vocab_size, mc.max_position_embeddings, self.cfg.train.seed,
                          log=self.metrics_print if self.rank == 0 else None)

    def metrics_print(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    # ---------------------------------------------------------------------------------------- loop
    def train(self) -> list[dict]:
        cfg = self.cfg
        rows = []
        self.step = self.checkpoint.resume()
        self.tokens = self.step * self.tokens_per_step
        self.metrics.set_start(self.step)
        stop = False
        while self.step < cfg.train.max_steps and not stop:
            self.watchdog.progress(self.step + 1)
            row = self.train_step()
            if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == cfg.train.max_steps):
                row["eval_loss"] = self.evaluate()
            self.metrics.log(row)
            rows.append(row)
            if self.skipped_in_a_row >= cfg.train.max_skipped_steps:  # before any save: keep the last good one
                raise JetMoEError(
                    f"{self.skipped_in_a_row} consecutive steps had a non-finite loss or gradient (last at step "
                    f"{self.step}); lower train.lr or check the data. The last checkpoint is untouched")
            self.checkpoint.after_step(self.step)
            stop = self.checkpoint.should_stop()
        self.checkpoint.finish(self.step)
        return rows

    def train_step(self) -> dict:
        cfg = self.cfg
        engine = self.engine
        batches = _pipe_batches(self.loader.next_step(), self.device)
        self.parts.tracker.reset()
        lr = engine.get_lr()[0]
        skipped_before = engine.skipped_steps
        t0 = time.perf_counter()
        lm_loss = float(engine.train_batch(data_iter=iter(batches)))
        stats = self.parts.tracker.reduce(self.device)
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        skipped = engine.skipped_steps != skipped_before or not math.isfinite(lm_loss)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.skipped_total += int(skipped)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        mc = self.model_config
        balance, z = stats.balance_loss, stats.z_loss
        aux = mc.aux_loss_coef * balance + mc.z_loss_coef * z
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        tflops = self.flops_per_step / elapsed / self.world / 1e12
        row = {
            "step": self.step,
            "lm_loss": lm_loss,
            "aux_loss": aux,
            "balance_loss": balance,
            "z_loss": z,
            "loss": lm_loss + aux,
            "lr": lr,
            "grad_norm": grad_norm if grad_norm is None or math.isfinite(grad_norm) else None,
            "tokens": self.tokens,
            "tokens_per_sec": self.tokens_per_step / elapsed,
            "step_time_s": elapsed,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "skipped": skipped,
            "skipped_total": self.skipped_total,
            "mem_static_mib": self.mem_static_mib,
            **peak_memory_mib(self.cuda),
        }
        every = cfg.logging.router_every
        if every and (self.step % every == 0 or self.step == 1):
            row["router"] = stats.per_layer()
        return row

    @torch.no_grad()
    def evaluate(self) -> float | None:
        cfg = self.cfg
        steps = self.data.eval_loader(cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                      self.layout.dp_rank, self.layout.dp, max_steps=cfg.train.eval_batches)
        if steps is None:
            return None
        losses = []
        for micro_batches in steps:
            batches = _pipe_batches(micro_batches, self.device)
            loss = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches))
            losses.append(float(loss))
        return sum(losses) / len(losses) if losses else None

    def close(self) -> None:
        self.watchdog.stop()
        self.metrics.close()


def _agree_on(value: str) -> str:
    """Rank 0's value on every rank (the run directory: Hydra's clock may differ between processes)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def run(cfg: DictConfig, run_dir: str | Path) -> list[dict]:
    trainer = Trainer(cfg, run_dir)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        if hasattr(trainer, "metrics"):
            trainer.close()
