"""The training loop. One optimizer step reads top to bottom in `Trainer.train_step`: this rank's
micro-batches, the pipeline's forward/backward/step, the routers' statistics, the objective, the
metrics row. Checkpoints (`CheckpointManager`) are told about each step boundary by `train`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from jetmoe.data.fingerprint import data_fingerprint
from jetmoe.data.loader import micro_batches_per_step
from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger
from jetmoe.model import aux_loss
from jetmoe.parallel.pipeline import stage_blocks
from jetmoe.parallel.process_group import close_process_group, init_process_group, start_deepspeed_comm
from jetmoe.parallel.topology import make_layout
from jetmoe.training.checkpoint import CheckpointManager, ModelParts
from jetmoe.training.checkpoint.folders import checkpoint_root
from jetmoe.training.config import RunConfig, precision, use_cuda
from jetmoe.training.determinism import set_deterministic
from jetmoe.training.engine import EngineCounters, EngineParts, build_engine, compile_on
from jetmoe.training.expert_bias import ExpertBias
from jetmoe.training.global_balance import GlobalBalance
from jetmoe.training.metrics import MetricsLogger, flops_per_token, peak_memory_mib, peak_tflops, rss_mib
from jetmoe.training.profiling import StepProfiler
from jetmoe.training.router_health import HealthSettings, RouterHealth
from jetmoe.training.router_stats import RouterTracker
from jetmoe.training.run_lock import lock_for_job
from jetmoe.training.run_record import record_config
from jetmoe.training.sampling import Sampler, SampleSettings
from jetmoe.training.nonfinite_trace import sentence, trace_step
from jetmoe.training.skipped_data import SkippedData
from jetmoe.training.spike_guard import SpikeGuard
from jetmoe.training.stragglers import StragglerWatch
from jetmoe.training.watchdog import Watchdog
from jetmoe.training.write_errors import stop_if_unwritable

logger = get_logger(__name__)


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
    def __init__(self, config: RunConfig, run_dir: str | Path):
        """config: the run config, typed and checked (jetmoe.training.config); run_dir: where this run writes."""
        self.config = config
        self.run_dir = Path(run_dir)
        self.state = TrainState()
        self.skipped_in_a_row = 0
        self.next_row: dict = {}  # fields for the next step's row (what a rollback did)
        self.nonfinite_source = ""  # the last non-finite step's source (jetmoe.training.nonfinite_trace)

    # -------------------------------------------------------------------------------------- set-up
    def setup(self) -> "Trainer":
        c, train = self.config, self.config.train
        # First of all: cuBLAS reads its workspace setting when it initialises, before any CUDA work of ours.
        set_deterministic(train.deterministic)
        self.cuda = use_cuda(train)
        self.precision = precision(train, self.cuda)
        self.rank, self.world = init_process_group(self.cuda, timedelta(seconds=c.parallel.timeout_s))
        self.watchdog = Watchdog.for_job(self.rank, train.stall_warn_s)  # peer failures, stalls
        self.is_rank0 = self.rank == 0
        self.run_dir = Path(_agree_on(str(self.run_dir)))
        self.lock = lock_for_job(self.run_dir, self.is_rank0,  # one job per run and checkpoint directory
                                 checkpoints=checkpoint_root(c.checkpoint, self.run_dir))  # (before any write)
        self.model_config = mc = c.model
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.layout = make_layout(self.world, self.rank, c.parallel.pp, c.parallel.ep, mc.num_hidden_layers,
                                  mc.num_local_experts)
        micro_batches_per_step(train.global_batch_size, train.micro_batch_size, self.layout.dp)
        self.profiler = StepProfiler.from_train(train, self.run_dir, self.rank, self.cuda)
        # Data before the engine: a bad path or tokenizer fails within seconds.
        from jetmoe.data import build_data

        self.data = build_data(c.data, mc.vocab_size, mc.max_position_embeddings, train.seed, log=logger.info,
                               special_tokens=(mc.bos_token_id, mc.eos_token_id))  # data=mixture checks them
        self.routers = RouterTracker(mc.num_hidden_layers, mc.num_local_experts)
        lg = c.logging
        self.router_health = RouterHealth(HealthSettings(lg.router_window, lg.router_collapse_share,
                                                         lg.router_collapse_steps))
        start_deepspeed_comm(self.cuda, timedelta(seconds=c.parallel.timeout_s))  # after the user's checks
        self.parts: EngineParts = build_engine(
            train, c.optim, c.parallel, mc, self.layout, device=self.device, bf16=self.precision == "bf16",
            compiled=compile_on(train.compile, self.cuda, train.compile_cache_dir), document_mask=c.data.document_mask,
            seq_len=c.data.seq_len, on_router_loss=self.routers.record)
        self.engine = self.parts.engine
        self.expert_bias = None
        if train.balance_bias_rate:
            self.expert_bias = ExpertBias(mc.num_hidden_layers, mc.num_local_experts, train.balance_bias_rate,
                                          self.device)
            self.expert_bias.install(stage_blocks(self.parts.module))
        self.stragglers = StragglerWatch(lg.straggler_every, lg.straggler_factor, self.cuda)
        self.stragglers.attach(self.engine)
        self.global_balance = None
        if train.balance_scope == "global_batch":
            self.global_balance = GlobalBalance(mc.num_hidden_layers, mc.num_local_experts, self.device)
            self.global_balance.install(self.parts.module)
        if self.cuda:  # the attention kernel, chosen once: jetmoe.parallel.attention_backend
            from jetmoe.parallel.attention_backend import describe, sdpa_priority

            capability = torch.cuda.get_device_capability()
            self.attention = sdpa_priority(capability)
            self.attention.__enter__()
            logger.info(describe(capability) + (" (document masks: FlexAttention)" if c.data.document_mask else ""))
        self.mem_static_mib = rss_mib()  # rank 0's resident memory with model, optimizer and data ready
        self.loader = self.data.train_loader(train.global_batch_size, train.micro_batch_size,
                                             self.layout.dp_rank, self.layout.dp, max_steps=train.max_steps)
        self.tokens_per_step = train.global_batch_size * c.data.seq_len
        self.flops_per_step = flops_per_token(mc, c.data.seq_len) * self.tokens_per_step
        self.peak = peak_tflops(c.cluster.peak_tflops, self.cuda, self.precision == "bf16")
        skipped = SkippedData(self.run_dir, train.spike.skip_samples, train.global_batch_size, self.is_rank0)
        self.guard = SpikeGuard(train.spike, self.engine, skipped, self.parts.grad_accumulation, self.layout.dp,
                                self.device, lambda *args, **kw: self.metrics.alert(*args, **kw))  # metrics: after resume
        logger.info(f"layout {self.layout.describe()} | blocks per stage {self.parts.module.block_counts} "
                    f"| micro-batches per step {self.parts.grad_accumulation} | precision {self.precision} "
                    f"| run dir {self.run_dir}")
        self.checkpoint = CheckpointManager(
            c.checkpoint, self.run_dir,
            ModelParts(self.parts.module, self.parts.optimizer, self.layout, self.parts.global_names, mc,
                       self.data.tokenizer),
            {"scheduler": self.parts.scheduler, "data": self.loader, "trainer": self.state,
             "engine": EngineCounters(self.engine), "spike": self.guard.detector,
             **({"expert_bias": self.expert_bias} if self.expert_bias is not None else {})},
            init_from=c.init_from, data_fingerprint=data_fingerprint(self.data), record=c.resolved)
        self.sampler = Sampler(SampleSettings.from_train(train), self.engine, self.data.tokenizer, self.layout,
                               mc.max_position_embeddings, self.device)
        return self

    # ---------------------------------------------------------------------------------------- loop
    def train(self) -> list[dict]:
        train = self.config.train
        rows = []
        self.checkpoint.resume()
        if self.is_rank0:  # every check passed: the directory now describes this launch too
            record_config(self.run_dir, self.config.resolved, self.state.step)
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.parts.ds_config, indent=2) + "\n")
        # only now: a refused resume leaves metrics.jsonl and wandb untouched
        self.metrics = MetricsLogger(self.run_dir, self.config.logging, self.is_rank0, train.max_steps, train.log_every,
                                     record=self.config.resolved)
        self.metrics.set_start(self.state.step)
        stop = False
        while self.state.step < train.max_steps and not stop:
            self.watchdog.progress(self.state.step + 1)
            with self.profiler.step(self.state.step + 1):  # traces train.profile_steps; names OOM snapshots
                row = self.train_step()
            if self.guard.rollback_due and self._roll_back(rows, row):
                continue
            if train.eval_every and (self.state.step % train.eval_every == 0 or self.state.step == train.max_steps):
                row.update(self.evaluate())
            self.metrics.log(row)
            if self.sampler.settings.due(self.state.step, train.max_steps):
                self.metrics.log_samples(self.sampler.sample(self.state.step))
            rows.append(row)
            if self.skipped_in_a_row >= train.max_skipped_steps:  # before any save; the one in flight is committed
                kept = self.checkpoint.drain()
                what = "were loss spikes" if row.get("skip_reason") == "spike" else "had a non-finite loss or gradient"
                raise JetMoEError(
                    f"{self.skipped_in_a_row} consecutive steps {what} (last at step "
                    f"{self.state.step}{self.nonfinite_source}); lower train.lr or check the data. "
                    + (f"The newest checkpoint of a finite step is kept: {kept}" if kept else "No checkpoint was saved"))
            self.checkpoint.after_step(self.state.step, self.skipped_in_a_row)
            stop = self.checkpoint.should_stop(self.state.step)
            stop_if_unwritable(self.metrics, self.checkpoint, self.state.step, self.run_dir)  # a full disk: one line
        self.checkpoint.finish(self.state.step)
        return rows

    def _roll_back(self, rows: list[dict], row: dict) -> bool:
        """The step just run was a loss spike under train.spike.policy=rollback: continue from the newest checkpoint
        before it, without the spike's data. False when there is no such checkpoint (the step stays skipped)."""
        fields = self.guard.roll_back(self.state.step, self.checkpoint)
        if "rollback" not in fields:
            _merge_row(row, fields)
            return False
        self.skipped_in_a_row = 0
        rows[:] = [r for r in rows if r["step"] <= self.state.step]
        self.metrics.set_start(self.state.step)  # the rows after the checkpoint are trained again
        self.next_row = fields
        return True

    def train_step(self) -> dict:
        """One optimizer step: forward, backward and update over this rank's micro-batches (the pipeline's
        1F1B schedule), then the objective and router statistics of the whole global batch."""
        engine, mc = self.engine, self.model_config
        self.guard.before_step(self.state.step + 1, self.loader)  # skipped data passed over; the update's gate armed
        batches = _pipe_batches(self.loader.next_step(), self.device)
        lr = engine.get_lr()[0]
        skipped_before = engine.skipped_steps
        self.routers.reset()
        t0 = time.perf_counter()
        self.stragglers.start(self.state.step + 1)

        if self.global_balance is not None:  # the loads of the whole global batch, before any backward
            self.global_balance.measure(lambda: engine.eval_batch(
                iter(batches), reduce_output=None, bcast_loss=False, num_micro_batches=len(batches)))
        lm_loss = float(engine.train_batch(data_iter=iter(batches)))  # mean over micro-batches and dp
        if self.global_balance is not None:
            self.global_balance.done()
        routers = self.routers.reduce(self.device)  # each router's losses: mean per micro-batch, all ranks
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0

        if self.expert_bias is not None:  # the next step chooses with biases moved by this step's loads
            self.expert_bias.update(routers.tokens)
        aux = aux_loss(routers.balance_loss, routers.z_loss, mc.aux_loss_coef, mc.z_loss_coef)
        nonfinite = engine.skipped_steps != skipped_before or not math.isfinite(lm_loss)
        skipped = nonfinite or self.guard.update_skipped
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
            **peak_memory_mib(self.cuda),
        }
        _merge_row(row, self.guard.after_step(self.state.step))
        if nonfinite:
            row["nonfinite"] = self._trace_nonfinite(batches)
        _merge_row(row, self.next_row)
        self.next_row = {}
        by_source = self.loader.tokens_by_source()  # data=mixture: cumulative tokens per source
        if by_source is not None:
            row["tokens_by_source"] = by_source
        if self.parts.compiled and self.state.step == 1:
            self._log_compile_time()
        every = self.config.logging.router_every
        if every and (self.state.step % every == 0 or self.state.step == 1):
            row["router"] = {**routers.per_layer(), **self.router_health.summary()}
        row.update(self._router_collapse(routers.tokens))
        row.update(self.stragglers.finish(self.state.step, self.device))
        return row

    def _trace_nonfinite(self, batches: list) -> dict | None:
        """Replay the step just skipped as non-finite with every module watched; name the source. Collective."""
        found = trace_step(self.engine, batches, self.layout.stage, self.rank, self.guard.gate.closed,
                           [EngineCounters(self.engine), self.parts.scheduler])
        self.nonfinite_source = f"; {sentence(found)}"
        logger.warning(f"step {self.state.step} was not finite: {sentence(found)}")
        return found

    def _router_collapse(self, tokens) -> dict:
        """`router_collapsed` (kind.layer of every collapsed router) while any is; a warning when one collapses."""
        lg = self.config.logging
        for name in self.router_health.observe(tokens):
            logger.warning(f"router {name} collapsed: one expert took more than {lg.router_collapse_share:.0%} of "
                           f"its tokens for {lg.router_collapse_steps} steps in a row")
        collapsed = self.router_health.collapsed()
        return {"router_collapsed": collapsed, "routers_collapsed": len(collapsed)} if collapsed else {}

    def _log_compile_time(self) -> None:
        """Once, after the first step (which compiled every block's graphs, forward and backward)."""
        from jetmoe.parallel.compile import compile_stats

        stats = compile_stats()
        logger.info(f"compile: {stats['compile_s']:.1f} s in the first step ({stats['graphs']} graphs, "
                           f"{stats['graph_breaks']} graph breaks)")

    def evaluate(self) -> dict:
        """`eval_loss` on the held-out data and, with a mixture, `eval_loss_by_source` (per-domain loss)."""
        train = self.config.train
        args = (train.global_batch_size, train.micro_batch_size, self.layout.dp_rank, self.layout.dp)
        row = {"eval_loss": self._eval_loss(self.data.eval_loader(*args, max_steps=train.eval_batches))}
        by_source = self.data.eval_loaders_by_source(*args, max_steps=train.eval_batches)
        if by_source:
            row["eval_loss_by_source"] = {name: self._eval_loss(steps) for name, steps in by_source.items()}
        return row

    @torch.no_grad()
    def _eval_loss(self, steps) -> float | None:
        if steps is None:
            return None
        losses = []
        for micro_batches in steps:
            batches = _pipe_batches(micro_batches, self.device)
            loss = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches))
            losses.append(float(loss))
        return sum(losses) / len(losses) if losses else None

    def close(self) -> None:
        if getattr(self, "attention", None) is not None:
            self.attention.__exit__(None, None, None)
            self.attention = None
        self.watchdog.stop()
        if hasattr(self, "profiler"):
            self.profiler.close()
        if hasattr(self, "metrics"):
            self.metrics.close()


def _merge_row(row: dict, fields: dict) -> None:
    """Add fields to a metrics row; `alerts` lists add up."""
    for key, value in fields.items():
        if key == "alerts":
            row.setdefault("alerts", []).extend(value)
        else:
            row[key] = value


def _agree_on(value: str) -> str:
    """Rank 0's value on every rank (the run directory: Hydra's clock may differ between processes)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def run(config: RunConfig, run_dir: str | Path) -> list[dict]:
    trainer = Trainer(config, run_dir)
    try:
        trainer.setup()
        rows = trainer.train()
    finally:
        if hasattr(trainer, "watchdog"):
            trainer.close()
        if getattr(trainer, "lock", None) is not None:
            trainer.lock.release()
    close_process_group()  # only after success: after a failure the peers may be gone (failures.py ends the job)
    return rows
