#!/usr/bin/env python
"""The GPU check: what only a GPU can show, measured on one H100/H200 within a budget (default 7 minutes).

    python bench/gpu.py --out gpu_check.json              # on one GPU
    python bench/gpu.py --smoke --out smoke.json          # every section at tiny shapes, on CPU (the tests run this)

On the GPU machine the device tool lends (Python 3.12, torch 2.11, no package registry), the missing packages
travel as wheels built by bench/gpu_wheels.sh; the README gives the one-line command.

Sections, in this order (each one's result, error or "out_of_time" goes into the JSON, which is rewritten after
every section; one failing or overrunning section does not stop the others):
  versions      torch, CUDA, GPU, peak bf16 TFLOP/s by exact device name
  memory        HBM copy bandwidth; the BF16 optimizer's per-micro-batch accumulation sweep and AdamW, ns/param
  train         one recipe stage (8 JetMoE-8B blocks, 8 micro-batches of 4096 tokens: a quarter of the recipe's 32)
                through train/pretrain.py: loss falls, MFU, step breakdown (compute, grad_accumulation, optimizer);
                an async checkpoint at the last step when the disk has room, then a second launch resuming from it
  stack         8B blocks (2 and 4, micro-batch 1 and 2, 4096 tokens), bf16 forward+backward: ms per block, TFLOP/s
  grouped_gemm  expert shapes, balanced / skewed (odd sizes) / one empty expert: checked against the per-expert
                loop first, then timed; does torch's call sync with the host here (own process, with a timeout)
  sdpa          SDPA backends at the model's shapes, causal and document-masked; FlexAttention (a failure is reported
                as such, never timed as FlexAttention)
  profile       one iteration's device time by aten op (grouped GEMM, matmul, attention, index/sort/scatter, other),
                the 10 longest kernels by name, host syncs per block
  dispatcher    an MoE layer's and a block's gradients, twice: bitwise equal (deterministic mode off and on)
  compile       eager against train.compile's compiled block: ms, compile s and graph breaks of this section; the
                last stage's head + loss, full logits against the chunked loss
The JSON's `calibration` gathers the efficiencies the planner takes (`cluster.calibration=PATH`).
FLOPs follow jetmoe.plan.throughput (causal attention counted as half, Megatron's convention).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

# Before torch initialises cuBLAS: the dispatcher section turns deterministic algorithms on mid-run.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from gpu_env import Env  # noqa: E402
from gpu_model import section_compile, section_profile, section_stack  # noqa: E402
from gpu_report import calibration, summary_line  # noqa: E402
from gpu_sections import (  # noqa: E402
    grouped_gemm_worker, section_dispatcher, section_grouped_gemm, section_memory, section_sdpa, section_versions)
from gpu_train import section_train  # noqa: E402

DEFAULT_BUDGET_S = 420.0
# (name, seconds of the default budget). A section may use its share plus whatever earlier ones left unused.
SHARES = (("versions", 5), ("memory", 10), ("train", 240), ("stack", 25), ("grouped_gemm", 25), ("sdpa", 30),
          ("profile", 15), ("dispatcher", 20), ("compile", 50))


class OutOfTime(Exception):
    pass


class Deadline:
    """A section's time: `left()` seconds until it is stopped (subprocess timeouts use it)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _on_alarm(signum, frame):
    raise OutOfTime()


def section_seconds(shares: list[tuple[str, float]], index: int, left_total: float) -> float:
    """The seconds section `index` may run: its share, plus what the budget holds beyond the later sections'
    shares; never more than the budget has left."""
    later = sum(share for _, share in shares[index + 1:])
    return max(0.0, min(left_total, max(shares[index][1], left_total - later)))


class Check:
    def __init__(self, env: Env, out: Path, budget_s: float, cache_dir: Path):
        self.env, self.out, self.budget_s, self.cache_dir = env, out, budget_s, cache_dir
        self.result: dict = {"budget_s": budget_s, "failed_sections": [], "out_of_time_sections": []}
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def write(self) -> None:
        with self.lock:
            try:
                text = json.dumps({**self.result, "calibration": calibration(self.result)}, indent=1, default=str)
            except (RuntimeError, TypeError, ValueError) as e:  # a section's dict changing under the watchdog
                text = json.dumps({"write_error": repr(e)})
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out)

    def run(self, sections: dict, only: list[str] | None) -> None:
        scale = self.budget_s / DEFAULT_BUDGET_S
        shares = [(name, share * scale) for name, share in SHARES if not only or name in only]
        for index, (name, _) in enumerate(shares):
            left_total = self.budget_s - (time.monotonic() - self.start)
            seconds = section_seconds(shares, index, left_total)
            out: dict = {}
            self.result[name] = out
            t0 = time.perf_counter()
            if seconds < 0.1:
                out["out_of_time"] = "the budget was spent before this section started"
            else:
                self._run_one(name, sections[name], out, Deadline(seconds))
            self.result[name + "_s"] = round(time.perf_counter() - t0, 2)
            if "error" in out:
                self.result["failed_sections"].append(name)
            if "out_of_time" in out:
                self.result["out_of_time_sections"].append(name)
            if self.env.cuda:
                torch.cuda.empty_cache()
            self.write()
            print(summary_line(name, out, self.result[name + "_s"]), flush=True)

    def _run_one(self, name: str, fn, out: dict, deadline: Deadline) -> None:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, deadline.seconds)
        try:
            fn(out, deadline)
        except OutOfTime:
            out["out_of_time"] = f"stopped at its deadline ({deadline.seconds:.0f} s); the numbers above it stand"
        except Exception:
            out["error"] = traceback.format_exc()[-3000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def watchdog(self, grace_s: float = 60.0) -> None:
        """A section stuck in native code (a hung kernel) never sees its alarm: past the budget plus a grace,
        write what there is and leave."""

        def watch():
            time.sleep(self.budget_s + grace_s)
            self.result["watchdog"] = f"still running {grace_s:.0f} s past the budget: stopped"
            self.write()
            print(f"[watchdog] past the budget by {grace_s:.0f} s: wrote {self.out} and stopped", flush=True)
            os._exit(3)

        threading.Thread(target=watch, daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--only", nargs="*", help="run only these sections")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="whole check, seconds (default 420)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on with a GPU")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when its name is not known")
    ap.add_argument("--cache-dir", help="one data + Inductor cache for every section (default: beside --out)")
    ap.add_argument("--train-micro-batch", type=int, default=1, choices=[1, 2, 4, 8],
                    help="sequences per micro-batch in the train section (8 sequences per step)")
    ap.add_argument("--grouped-gemm-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grouped_gemm_worker:
        grouped_gemm_worker(args.smoke)
        return 0
    env = Env(args.smoke, args.peak_tflops)
    if not env.cuda and not args.smoke:
        print("no GPU: running the CPU smoke version (--smoke)", flush=True)
        env = Env(True)
    out = Path(args.out).resolve()
    cache_dir = Path(args.cache_dir or out.parent / "gpu_check_cache").resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["JETMOE_CACHE_DIR"] = str(cache_dir)  # the train launches' data and Inductor caches
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")  # the same Inductor cache in this process
    compile_on = args.compile == "on" or (args.compile == "auto" and env.cuda)
    sections = {
        "versions": lambda out, d: section_versions(env, out),
        "memory": lambda out, d: section_memory(env, out, cache_dir),
        "train": lambda out, d: section_train(env, out, d, cache_dir, compile_on, check.result, args.train_micro_batch),
        "stack": lambda out, d: section_stack(env, out),
        "grouped_gemm": lambda out, d: section_grouped_gemm(env, out, d),
        "sdpa": lambda out, d: section_sdpa(env, out),
        "profile": lambda out, d: section_profile(env, out),
        "dispatcher": lambda out, d: section_dispatcher(env, out),
        "compile": lambda out, d: section_compile(env, out, compile_on),
    }
    unknown = sorted(set(args.only or []) - set(sections))
    if unknown:
        print(f"gpu.py: unknown section(s) {', '.join(unknown)}; choose from {', '.join(sections)}", file=sys.stderr)
        return 2
    check = Check(env, out, args.budget_s, cache_dir)
    check.watchdog()
    check.run(sections, args.only)
    failed, late = check.result["failed_sections"], check.result["out_of_time_sections"]
    print(f"wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; out of time: {', '.join(late)}" if late else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
