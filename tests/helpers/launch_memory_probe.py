"""Run a few real training steps of train/pretrain.py's Trainer and record this rank's memory.

Used by tests/test_plan_memory.py under torchrun. The resident-set high-water mark is reset (Linux
/proc/self/clear_refs) right before the engine is built, and again right after, so the record holds:
  base          RSS before the engine (interpreter, torch, DeepSpeed, data)
  train_hwm     highest RSS during the training steps
  end_rss       RSS after the steps, and end_tensors: bytes of every tensor alive then
Memory that is not tensors but appeared after `base` (DeepSpeed's comm buffers and code, allocator
slack) is end_rss - base - end_tensors; the training peak of the tensors is
train_hwm - base - that. All values in KiB. Run with a small fixed MALLOC_MMAP_THRESHOLD_ so that freed
tensors go back to the OS instead of staying resident in malloc's heap.
Usage: launch_memory_probe.py OUT_DIR STEPS [overrides...]
"""

import json
import sys
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def live_tensor_kib() -> int:
    import gc
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # gc.get_objects() reaches lazy modules that warn when inspected
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        except RuntimeError:  # tensors without storage
            continue
    return sum(storages.values()) // 1024


def main() -> None:
    out_dir, steps, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    from jetmoe.training import trainer as trainer_mod
    from jetmoe.training.compose import load

    config = load(overrides)

    record = {}
    real_build = trainer_mod.build_engine

    def measured_build(*args, **kwargs):
        import gc

        gc.collect()
        record["base"] = rss_kib("VmRSS")
        reset_peak()
        parts = real_build(*args, **kwargs)
        record["engine_hwm"] = rss_kib("VmHWM")
        gc.collect()
        reset_peak()
        return parts

    trainer_mod.build_engine = measured_build
    t = trainer_mod.Trainer(config, out_dir / "run").setup()
    for _ in range(steps):
        t.train_step()
    record["train_hwm"] = rss_kib("VmHWM")
    record["end_tensors"] = live_tensor_kib()
    record["end_rss"] = rss_kib("VmRSS")
    record.update(rank=t.rank, stage=t.layout.stage if hasattr(t.layout, "stage") else None,
                  blocks=t.parts.module.block_counts)
    (out_dir / f"memory-rank{t.rank}.json").write_text(json.dumps(record))
    t.close()


if __name__ == "__main__":
    main()
