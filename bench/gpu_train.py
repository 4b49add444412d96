"""The GPU check's train section (see bench/gpu.py): one recipe stage trained through the real entry point.

Shape: 8 JetMoE-8B blocks (the recipe's pp=3 puts 8 of 24 on a stage), 4096 tokens, 8 sequences per step as 8
micro-batches of 1 (a quarter of the recipe's 32; the bubble and the dp reduction are the planner's) or, with
--train-micro-batch 2, 4 of 2, bf16,
train.compile as on a cluster. The one process holds the embedding and the head too (pp=1: first and last stage).
Launch 1 trains, timing the step's parts (bench/gpu_train_launch.py), and saves asynchronously at its last step
when the disk has room; launch 2 resumes from that checkpoint for one step. Each launch has its own result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_env import ROOT, Env
from jetmoe.model import JetMoEConfig
from jetmoe.plan.checkpoint import bytes_per_param
from jetmoe.plan.params import count_params

STAGE_BLOCKS, SEQUENCES_PER_STEP, RECIPE_MICRO_BATCHES = 8, 8, 32


def train_overrides(env: Env, steps: int, compile_on: bool, micro_batch: int = 1) -> list[str]:
    common = [f"train.max_steps={steps}", "train.eval_every=0", "logging.progress_bar=false", "logging.console=false",
              "logging.wandb.mode=disabled", "logging.router_every=0", "optim.warmup_steps=2", "train.precision=bf16",
              f"train.compile={'true' if compile_on else 'false'}"]
    if env.smoke:
        return common + ["model.num_hidden_layers=1", "data.seq_len=32", "train.global_batch_size=4",
                         "train.micro_batch_size=2"]
    peak = [f"cluster.peak_tflops={env.peak}"] if env.peak else []
    return common + ["model=jetmoe_8b", f"model.num_hidden_layers={STAGE_BLOCKS}", "data.seq_len=4096",
                     f"train.global_batch_size={SEQUENCES_PER_STEP}", f"train.micro_batch_size={micro_batch}",
                     "train.lr=3e-4", *peak]


def checkpoint_bytes(env: Env) -> int:
    """What the launch's checkpoint will hold: bf16 weights, fp32 masters and both Adam moments."""
    config = (JetMoEConfig.preset("jetmoe_8b", num_hidden_layers=STAGE_BLOCKS) if not env.smoke
              else env.config)
    return count_params(config).total * bytes_per_param(2)


def _launch(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """(exit code or None on timeout, the launch's output)."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=environ)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        except BaseException:  # the section's own deadline: never leave a training process behind
            proc.kill()
            proc.wait()
            raise
    return code, log.read_text(errors="replace")


def section_train(env: Env, out: dict, deadline, cache_dir: Path, compile_on: bool, earlier: dict,
                  micro_batch: int = 1) -> None:
    """micro_batch: sequences per micro-batch (the step keeps 8 sequences: 8 micro-batches of 1, 4 of 2, ...)."""
    steps = 6 if env.smoke else 12
    run_dir = Path(tempfile.mkdtemp(prefix="jetmoe_gpu_check_", dir=cache_dir))
    step_times = run_dir / "step_times.jsonl"
    overrides = train_overrides(env, steps, compile_on, micro_batch) + [f"hydra.run.dir={run_dir}"]
    # The checkpoint at the last step, and the launch resuming from it, only when the disk has the room and the
    # section the time: training (~90 s with compiling), the write, reading it back, the second start (~60 s).
    need, free = checkpoint_bytes(env), shutil.disk_usage(cache_dir).free
    gbps = earlier.get("memory", {}).get("disk_write_gbps")
    write_s = need / (gbps * 1e9) if gbps else None
    roomy, timely = need * 1.3 < free, write_s is not None and 90 + 2 * write_s + 60 < deadline.left()
    saving = roomy and (timely or env.smoke)
    overrides += ([f"checkpoint.every={steps}", "checkpoint.async=true", "checkpoint.keep=1"] if saving
                  else ["checkpoint.every=0"])
    micro_batches = SEQUENCES_PER_STEP // micro_batch if not env.smoke else 2
    out["shape"] = {"blocks": STAGE_BLOCKS if not env.smoke else 1, "micro_batches_per_step": micro_batches,
                    "micro_batch_size": micro_batch if not env.smoke else 2,
                    "recipe_micro_batches": RECIPE_MICRO_BATCHES, "seq_len": 4096 if not env.smoke else 32,
                    "steps": steps, "compile": compile_on}
    out["checkpoint_plan"] = {"bytes": need, "disk_free_bytes": free, "disk_write_gbps": gbps, "saving": saving}
    if not roomy:
        out["checkpoint_plan"]["skipped"] = f"{free / 2**30:.1f} GiB free < 1.3 x {need / 2**30:.1f} GiB"
    elif not saving:
        out["checkpoint_plan"]["skipped"] = (f"writing {need / 2**30:.1f} GiB at {gbps or 0:.2f} GB/s (~{write_s or 0:.0f} s)"
                                             f" and reading it back does not fit the section's {deadline.left():.0f} s")
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_train_launch.py"), *overrides]
    os.environ["JETMOE_STEP_TIMES"] = str(step_times)
    resume_reserve = 45 if saving and not env.smoke else 0
    t0 = time.perf_counter()
    code, log = _launch(cmd, deadline.left() - resume_reserve - 3, run_dir / "launch.log")
    launch = out["launch"] = _launch_result(env, run_dir, step_times, code, log, time.perf_counter() - t0, steps)
    launch["command"] = " ".join(cmd)
    if code != 0 or not saving:
        return
    again = [sys.executable, str(ROOT / "train" / "pretrain.py"),
             *[o for o in overrides if not o.startswith(("train.max_steps", "checkpoint."))],
             f"train.max_steps={steps + 1}", "checkpoint.every=0"]
    t0 = time.perf_counter()
    code, resumed_log = _launch(again, deadline.left() - 2, run_dir / "resume.log")
    out["resume"] = _resume_result(code, resumed_log, time.perf_counter() - t0)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # tens of GB on a small disk


def _launch_result(env: Env, run_dir: Path, step_times: Path, code, log: str, wall_s: float, steps: int) -> dict:
    out: dict = {"wall_s": wall_s, "exit": code}
    if code is None:
        out["out_of_time"] = "the launch ran past the section's deadline; the steps it finished are below"
    elif code != 0:
        out["error"] = log[-3000:]
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "lm_loss" in r and r["step"] <= steps]
    if rows:
        later = rows[len(rows) // 2:]  # past compilation and warm-up
        mfus = [r["mfu"] for r in later if r.get("mfu") is not None]
        out.update(steps_done=len(rows), first_lm_loss=rows[0]["lm_loss"], last_lm_loss=rows[-1]["lm_loss"],
                   loss_fell=rows[-1]["lm_loss"] < rows[0]["lm_loss"],
                   mfu=statistics.median(mfus) if mfus else None,
                   tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in later),
                   step_time_s=statistics.median(r["step_time_s"] for r in later if "step_time_s" in r)
                   if any("step_time_s" in r for r in later) else None,
                   peak_mem_mib=max((r.get("peak_mem_mib") or 0) for r in rows) or None)
    timed = [json.loads(line) for line in step_times.read_text().splitlines()] if step_times.exists() else []
    if timed:
        later = timed[len(timed) // 2:]
        parts = ("compute", "grad_accumulation", "optimizer")
        out["step_breakdown_s"] = {k: statistics.median(t[k] for t in later) for k in parts}
        out["step_s_device"] = statistics.median(t["step_s"] for t in later)
        out["accumulation_calls_per_step"] = later[-1]["accumulation_calls"]
        out["steps_timed"] = len(timed)
    if m := re.search(r"compile: ([\d.]+) s in the first step \((\d+) graphs, (\d+) graph breaks\)", log):
        out["compile_s"], out["graphs"], out["graph_breaks"] = float(m.group(1)), int(m.group(2)), int(m.group(3))
    out.update(_checkpoint_numbers(log))
    return out


def _checkpoint_numbers(log: str) -> dict:
    """The async save's blocking and total seconds and its size, from the trainer's checkpoint lines."""
    out = {}
    if m := re.search(r"copied to host in ([\d.]+)s", log):
        out["checkpoint_blocking_s"] = float(m.group(1))
    if m := re.search(r"saved step \d+ to \S+ \(([\d.]+) MiB, ([\d.]+)s", log):
        out["checkpoint_mib"], out["checkpoint_save_total_s"] = float(m.group(1)), float(m.group(2))
    return out


def _resume_result(code, log: str, wall_s: float) -> dict:
    out: dict = {"wall_s": wall_s, "exit": code}
    if code is None:
        out["out_of_time"] = "the resumed launch ran past the section's deadline"
    elif code != 0:
        out["error"] = log[-3000:]
    if m := re.search(r"resumed from \S+ at step \d+.*?\(([\d.]+)s, verify=\w+\).*?\(([\d.]+)x\)", log):
        out["load_s"], out["bytes_read_over_share"] = float(m.group(1)), float(m.group(2))
    elif code == 0:
        out["error"] = "no 'resumed from' line: " + log[-1000:]
    return out
