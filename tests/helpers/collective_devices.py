"""train/pretrain.py with a spy on torch.distributed: every collective and point-to-point call records the
device types of the tensors it was given. Each rank writes {call name: [device types]} to
$JETMOE_TEST_DEVICES_DIR/rank<r>.json at exit (DeepSpeed's comm layer calls through torch.distributed too)."""

import atexit
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from jetmoe.training import cli

CALLS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
         "send", "recv", "isend", "irecv", "broadcast_object_list", "all_gather_object", "gather_object", "barrier")
seen: dict[str, set] = {}


def _devices(value, out: set) -> None:
    if torch.is_tensor(value):
        out.add(value.device.type)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _devices(v, out)


def _spy(name, real):
    def call(*args, **kwargs):
        devices = seen.setdefault(name, set())
        for value in (*args, *kwargs.values()):
            _devices(value, devices)
        return real(*args, **kwargs)
    return call


for name in CALLS:
    if hasattr(dist, name):
        setattr(dist, name, _spy(name, getattr(dist, name)))


@atexit.register
def _write() -> None:
    out = Path(os.environ["JETMOE_TEST_DEVICES_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({k: sorted(v) for k, v in seen.items()}))


if __name__ == "__main__":
    cli.main()
