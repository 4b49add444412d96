"""Every collective of the training path gets tensors the process group can serve on a GPU run.

A spy on torch.distributed records the device of every tensor handed to a collective or point-to-point
call during a real pp=2 run that trains, evaluates, samples and checkpoints. Some are CPU tensors (stop
signals, bookkeeping), so a plain "nccl" group (CUDA tensors only in torch 2.13) would crash the first
multi-GPU step; the group jetmoe creates on CUDA serves both."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.launch_util import free_port
from helpers.trainer_small import SMALL

from jetmoe.parallel.process_group import backend_for, served_device_types

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = Path(__file__).resolve().parents[1]


def test_collectives_get_tensors_the_cuda_process_group_serves(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "tests/helpers/collective_devices.py", *SMALL, "parallel.pp=2",
           "train.max_steps=2", "train.eval_every=2", "checkpoint.every=2", "train.sample_every=2",
           "train.sample_tokens=2", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JETMOE_TEST_DEVICES_DIR": str(tmp_path / "devices")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls: dict[str, set] = {}
    for path in (tmp_path / "devices").glob("rank*.json"):
        for name, devices in json.loads(path.read_text()).items():
            calls.setdefault(name, set()).update(devices)
    assert {"all_reduce", "broadcast_object_list"} <= set(calls) and ({"send", "isend"} & set(calls)), calls
    used = set().union(*calls.values())
    assert used == {"cpu"}  # this run trains on the CPU: every collective got a tensor on the training device
    assert used <= served_device_types(backend_for(cuda=True))  # and a GPU run's group serves CPU tensors too
    assert not used <= served_device_types("nccl")  # the old plain "nccl" group would not: the check can fail
