"""The training loop. One optimizer step reads top to bottom in `Trainer.train_step`: this rank's
micro-batches, the pipeline's forward/backward/step, the routers' statistics, the objective, the
metrics row. Checkpoints (`CheckpointManager`) are told about each step boundary by `train`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from jetmoe.data.loader import micro_batches_per_step
from jetmoe.errors import JetMoEError
from jetmoe.model import aux_loss
from jetmoe.parallel.process_group import init_process_group
from jetmoe.parallel.topology import make_layout
from jetmoe.training.checkpoint import CheckpointManager
from jetmoe.training.config import data_config, model_config, precision, use_cuda
from jetmoe.training.determinism import set_deterministic
from jetmoe.training.engine import EngineParts, build_engine
from jetmoe.training.metrics import MetricsLogger, flops_per_token, peak_memory_mib, peak_tflops, rss_mib
from jetmoe.training.router_stats import RouterTracker
from jetmoe.training.watchdog import Watchdog


@dataclass
class TrainState:
    """The trainer's own counters; checkpoints save and restore them."""

    step: int = 0  # optimizer steps done (skipped ones included)
    skipped_total: int = 0  # steps whose loss or gradient was not finite

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        self.skipped_total = int(state.get("skipped_total", 0))


def _pipe_batches(micro_batches: list[dict], device) -> list:
    """DeepSpeed's pipeline wants (inputs, labels) per micro-batch; only tensors cross stages."""
    return [((mb["input_ids"].to(device), mb["position_ids"].to(device)), mb["labels"].to(device))
            for mb in micro_batches]


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.state = TrainState()
        self.skipped_in_a_row = 0

    # -------------------------------------------------------------------------------------- set-up
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.cuda = use_cuda(cfg)
        self.rank, self.world = init_process_group(self.cuda, timedelta(seconds=cfg.parallel.timeout_s))
        self.watchdog = Watchdog.for_job(self.rank, cfg.train.stall_warn_s)  # peer failures, stalls
        self.is_rank0 = self.rank == 0
        self.run_dir = Path(_agree_on(str(self.run_dir)))
        self.model_config = model_config(cfg)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        mc = self.model_config
        self.layout = make_layout(self.world, self.rank, cfg.parallel.pp, cfg.parallel.ep, mc.num_hidden_layers,
                                  mc.num_local_experts)
        micro_batches_per_step(cfg.train.global_batch_size, cfg.train.micro_batch_size, self.layout.dp)
        # Data before the engine: a bad path or tokenizer fails within seconds.
        self.data = self._build_data()
        self.routers = RouterTracker(mc.num_hidden_layers, mc.num_local_experts)
        set_deterministic(cfg.train.deterministic)  # before the engine exists (cuBLAS reads it at start-up)
        self.parts: EngineParts = build_engine(cfg, mc, self.layout, on_router_loss=self.routers.record)
        self.engine = self.parts.engine
        self.mem_static_mib = rss_mib()  # rank 0's resident memory with model, optimizer and data ready
        self.loader = self.data.train_loader(cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                             self.layout.dp_rank, self.layout.dp)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_step = flops_per_token(mc, cfg.data.seq_len) * self.tokens_per_step
        self.peak = peak_tflops(cfg, self.cuda, precision(cfg) == "bf16")
        if self.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.metrics = MetricsLogger(self.run_dir, cfg, self.is_rank0, cfg.train.max_steps)
        self.metrics.print(f"layout {self.layout.describe()} | blocks per stage {self.parts.module.block_counts} "
                           f"| micro-batches per step {self.parts.grad_accumulation} | precision {precision(cfg)} "
                           f"| run dir {self.run_dir}")
        self.checkpoint = CheckpointManager(
            cfg, self.run_dir, module=self.parts.module, global_names=self.parts.global_names,
            optimizer=self.parts.optimizer, scheduler=self.parts.scheduler, loader=self.loader,
            train_state=self.state, layout=self.layout, model_config=mc, engine=self.engine,
            tokenizer=self.data.tokenizer)
        return self

    def _build_data(self):
        from jetmoe.data import build_data

        mc = self.model_config
        return build_data(data_config(self.cfg), mc.vocab_size, mc.max_position_embeddings, self.cfg.train.seed,
                          log=self.metrics_print if self.rank == 0 else None,
                          special_tokens=(mc.bos_token_id, mc.eos_token_id))  # data=mixture checks them

    def metrics_print(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    # ---------------------------------------------------------------------------------------- loop
    def train(self) -> list[dict]:
        cfg = self.cfg
        rows = []
        self.checkpoint.resume()
        self.metrics.set_start(self.state.step)
        stop = False
        while self.state.step < cfg.train.max_steps and not stop:
            self.watchdog.progress(self.state.step + 1)
            row = self.train_step()
            if cfg.train.eval_every and (self.state.step % cfg.train.eval_every == 0
                                         or self.state.step == cfg.train.max_steps):
                row["eval_loss"] = self.evaluate()
                if hasattr(self.data, "eval_loaders_by_source"):  # data=mixture hook (issue 12)
                    row["eval_loss_by_source"] = {name: self.evaluate(steps) for name, steps in
                                                  self.data.eval_loaders_by_source(
                                                      cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                                      self.layout.dp_rank, self.layout.dp,
                                                      max_steps=cfg.train.eval_batches).items()}
            self.metrics.log(row)
            rows.append(row)
            if self.skipped_in_a_row >= cfg.train.max_skipped_steps:  # before any save: keep the last good one
                raise JetMoEError(
                    f"{self.skipped_in_a_row} consecutive steps had a non-finite loss or gradient (last at step "
                    f"{self.state.step}); lower train.lr or check the data. The last checkpoint is untouched")
            self.checkpoint.after_step(self.state.step)
            stop = self.checkpoint.should_stop(self.state.step)
        self.checkpoint.finish(self.state.step)
        return rows

    def train_step(self) -> dict:
        """One optimizer step: forward, backward and update over this rank's micro-batches (the pipeline's
        1F1B schedule), then the objective and router statistics of the whole global batch."""
        engine, mc = self.engine, self.model_config
        batches = _pipe_batches(self.loader.next_step(), self.device)
        lr = engine.get_lr()[0]
        skipped_before = engine.skipped_steps
        self.routers.reset()
        t0 = time.perf_counter()

        lm_loss = float(engine.train_batch(data_iter=iter(batches)))  # mean over micro-batches and dp
        routers = self.routers.reduce(self.device)  # each router's losses: mean per micro-batch, all ranks
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0

        aux = aux_loss(routers.balance_loss, routers.z_loss, mc.aux_loss_coef, mc.z_loss_coef)
        skipped = engine.skipped_steps != skipped_before or not math.isfinite(lm_loss)
        self.state.step += 1
        self.state.skipped_total += int(skipped)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        tflops = self.flops_per_step / elapsed / self.world / 1e12
        row = {
            "step": self.state.step,
            "lm_loss": lm_loss,
            "aux_loss": aux,
            "balance_loss": routers.balance_loss,
            "z_loss": routers.z_loss,
            "loss": lm_loss + aux,
            "lr": lr,
            "grad_norm": grad_norm if grad_norm is None or math.isfinite(grad_norm) else None,
            "tokens": self.state.step * self.tokens_per_step,
            "tokens_per_sec": self.tokens_per_step / elapsed,
            "step_time_s": elapsed,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "skipped": skipped,
            "skipped_total": self.state.skipped_total,
            "mem_static_mib": self.mem_static_mib,
            **({"tokens_by_source": self.loader.tokens_by_source()}  # data=mixture hook (issue 12)
               if hasattr(self.loader, "tokens_by_source") else {}),
            **peak_memory_mib(self.cuda),
        }
        if self.parts.compiled and self.state.step == 1:
            self._log_compile_time()
        every = self.cfg.logging.router_every
        if every and (self.state.step % every == 0 or self.state.step == 1):
            row["router"] = routers.per_layer()
        return row

    def _log_compile_time(self) -> None:
        """Once, after the first step (which compiled every block's graphs, forward and backward)."""
        from jetmoe.parallel.compile import compile_stats

        stats = compile_stats()
        self.metrics.print(f"compile: {stats['compile_s']:.1f} s in the first step ({stats['graphs']} graphs, "
                           f"{stats['graph_breaks']} graph breaks)")

    @torch.no_grad()
    def evaluate(self, steps=None) -> float | None:
        cfg = self.cfg
        if steps is None:
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
