"""The planner's memory model against the measured peak of real training steps (CPU, fp32, DeepSpeed
ZeRO-1 pipeline engine) at pp=1 and pp=3.

Each rank runs the trainer for two steps under torchrun (tests/helpers/launch_memory_probe.py) and
records its resident-set high-water mark during training. From it we remove the process's memory
that is not tensors (interpreter, libraries, DeepSpeed's comm buffers), measured as RSS minus the
bytes of all live tensors at the end; what remains is the tensors' peak, which the planner predicts
(weights, gradients, ZeRO-1 optimizer shard, activations of the micro-batches in flight under 1F1B,
pipeline buffers, optimizer-step temporaries). CPU AdamW runs its single-tensor path, which keeps two
shard-sized temporaries (the foreach path on GPU keeps one), so the prediction uses that.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

from plan import NEEDS  # noqa: E402

from jetmoe.plan import inputs_from_config, make_plan  # noqa: E402
from jetmoe.training.compose import load  # noqa: E402
from jetmoe.plan.memory import Precision  # noqa: E402

# Big enough that the model's tensors dominate; layouts chosen so that activations in flight decide
# the peak on the first stages and the optimizer step on the others.
MODEL = [
    "model.hidden_size=256", "model.intermediate_size=1024", "model.num_local_experts=4",
    "model.kv_channels=64", "model.num_key_value_heads=4", "data.seq_len=256",
    "train.precision=fp32", "train.eval_every=0", "logging=quiet", "checkpoint.every=0",
]
LAYOUTS = {
    "pp1": (1, ["parallel.pp=1", "train.global_batch_size=4", "train.micro_batch_size=4"]),
    "pp3": (3, ["parallel.pp=3", "train.global_batch_size=6", "train.micro_batch_size=2"]),
}


def predicted_mib(overrides: list[str], gpus: int) -> list[float]:
    inputs = inputs_from_config(load(overrides + [f"cluster.gpus={gpus}"], NEEDS))
    inputs = dataclasses.replace(inputs, precision=dataclasses.replace(Precision.named("fp32"), adam_temporaries=2))
    return [m.peak / 2**20 for m in make_plan(inputs).memory]


def measured_mib(rec: dict) -> float:
    not_tensors = rec["end_rss"] - rec["base"] - rec["end_tensors"]
    return (rec["train_hwm"] - rec["base"] - not_tensors) / 1024


@pytest.mark.slow
def test_memory_model_within_10_percent_of_measured_peak(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="65536",
               JETMOE_CACHE_DIR=os.environ.get("JETMOE_CACHE_DIR", str(tmp_path / "cache")))
    procs = {}
    for name, (nproc, layout) in LAYOUTS.items():
        out = tmp_path / name
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(ROOT / "tests/helpers/launch_memory_probe.py"), str(out), "2", *MODEL, *layout]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=420)
        assert proc.returncode == 0, f"{name} failed:\n{log[-3000:]}"

    rows = []
    for name, (nproc, layout) in LAYOUTS.items():
        predicted = predicted_mib(MODEL + layout, nproc)
        for rank in range(nproc):
            rec = json.loads((tmp_path / name / f"memory-rank{rank}.json").read_text())
            rows.append((f"{name} stage {rank}", measured_mib(rec), predicted[rank]))
    report = "\n".join(f"{what}: measured {got:.1f} MiB, planner {want:.1f} MiB ({want / got - 1:+.1%})"
                       for what, got, want in rows)
    print(report)
    assert all(abs(want / got - 1) <= 0.10 for _, got, want in rows), report
