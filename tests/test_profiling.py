"""train.profile_steps: one torch.profiler trace per rank covering exactly the asked steps; CUDA memory
snapshots during the window and on out-of-memory (their logic run here with a stand-in for torch's CUDA-only
snapshot writer; a real OOM in a run is reported in one line naming the step and rank)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers.trainer_small import SMALL
from helpers.launch_util import ROOT

from jetmoe.errors import JetMoEError
from jetmoe.training.profiling import CudaMemory, StepProfiler, profile_window


def _step_spans(trace: dict) -> set[str]:
    return {e["name"] for e in trace["traceEvents"] if str(e.get("name", "")).startswith("step ")}


@pytest.mark.slow
def test_each_rank_writes_a_trace_of_exactly_the_profiled_steps(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "train/pretrain.py"), *SMALL, "parallel.pp=2", "train.eval_every=0", "train.max_steps=3",
         "train.profile_steps=[2,3]", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for rank in (0, 1):
        trace = json.loads((run_dir / "profile" / f"rank{rank}.pt.trace.json").read_text())
        assert _step_spans(trace) == {"step 2", "step 3"}
        ops = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "cpu_op"}
        assert "aten::mm" in ops or "aten::addmm" in ops or "aten::_grouped_mm" in ops, sorted(ops)[:20]
    assert not list((run_dir / "profile").glob("*.pickle"))  # memory snapshots are CUDA's


@pytest.mark.slow
def test_an_out_of_memory_error_in_a_run_names_the_step_and_rank_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/helpers/faulty_pretrain.py"), *SMALL, "train.eval_every=0",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "JETMOE_TEST_FAULT_RANK": "0", "JETMOE_TEST_FAULT": "oom"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: CUDA out of memory in step 2 on rank 0 (CUDA out of memory. Tried to allocate 2.00 GiB "
                      "(injected)); no memory snapshot (not on CUDA) (view it at https://pytorch.org/memory_viz); "
                      "lower train.micro_batch_size or turn on parallel.activation_checkpointing"]


class _Recorder:
    """Stands in for torch.cuda.memory's recorder and snapshot writer, which need a CUDA device."""

    def __init__(self):
        self.calls = []

    def record(self, enabled, **kwargs):
        self.calls.append(enabled)

    def dump(self, path):
        self.calls.append("dump")
        with open(path, "wb") as f:
            f.write(b"snapshot")


def test_out_of_memory_dumps_a_snapshot_and_names_it(tmp_path):
    rec = _Recorder()
    profiler = StepProfiler(tmp_path, rank=1, window=None, memory=CudaMemory(dump=rec.dump, record=rec.record))
    with pytest.raises(JetMoEError) as info:
        with profiler.step(4):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    path = tmp_path / "profile" / "oom_rank1_step4.pickle"
    assert path.read_bytes() == b"snapshot"
    assert f"memory snapshot {path}" in str(info.value) and "step 4 on rank 1" in str(info.value)
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


def test_the_profiled_window_records_and_dumps_the_memory_history(tmp_path):
    rec = _Recorder()
    profiler = StepProfiler(tmp_path, rank=0, window=(2, 3), memory=CudaMemory(dump=rec.dump, record=rec.record))
    for step in (1, 2, 3, 4):
        with profiler.step(step):
            torch.ones(8) @ torch.ones(8)
            assert rec.calls == (["all"] if step in (2, 3) else [] if step == 1 else ["all", "dump", None])
    assert (tmp_path / "profile" / "memory_rank0.pickle").read_bytes() == b"snapshot"
    assert (tmp_path / "profile" / "rank0.pt.trace.json").exists()


@pytest.mark.parametrize("steps", [[3], [0, 2], [4, 2], [1, 2, 3]])
def test_profile_steps_must_be_a_range(steps):
    with pytest.raises(JetMoEError, match="train.profile_steps"):
        profile_window(steps)
    assert profile_window([]) is None and profile_window([2, 2]) == (2, 2)
