"""What the trainer costs on top of the model: its optimizer step (DeepSpeed's pipeline engine, pp=1) against the
same model's forward, backward and AdamW step in a plain loop over the same micro-batches, alternated in one
process; medians of repeats. Prints both, the overhead ratio last, and with --profile the trainer step's
heaviest Python functions (cumulative seconds).

    python bench/engine_overhead.py [--repeats 5] [--hidden 384] [--layers 4] [--micro-batches 4] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    return p.parse_args()


def trainer(args, run_dir: str):
    from jetmoe.training.compose import load
    from jetmoe.training.trainer import Trainer

    overrides = [f"model.hidden_size={args.hidden}", f"model.num_hidden_layers={args.layers}",
                 f"model.num_local_experts={args.experts}", "model.num_key_value_heads=6", "model.kv_channels=64",
                 "model.intermediate_size=1024", "model.vocab_size=8192", f"data.seq_len={args.seq}",
                 f"train.micro_batch_size={args.micro_batch}",
                 f"train.global_batch_size={args.micro_batch * args.micro_batches}", "train.precision=fp32",
                 "train.max_steps=1000", "train.eval_every=0", "logging=quiet", "logging.wandb.mode=disabled",
                 "logging.router_every=0", "optim.grad_clip=1.0", "train.compile=false"]
    return Trainer(load(overrides), run_dir).setup()


def plain_loop(t):
    """The same model (transformers-exact JetMoEForCausalLM, the trainer's own weights), micro-batches and
    AdamW: forward, backward per micro-batch, one clip and step."""
    from jetmoe.model import JetMoEForCausalLM

    model = JetMoEForCausalLM(t.model_config)
    state = {t.parts.global_names[n]: p.detach().clone() for n, p in t.parts.module.named_parameters()}
    model.load_state_dict(state, strict=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [t.loader.next_step() for _ in range(2)]

    def step(i: int = 0):
        ids_batches = batches[i % len(batches)]
        for ids, labels in _micro_batches(ids_batches):
            model(ids, labels=labels).loss.div(len(ids_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _micro_batches(step_batches):
    for mb in step_batches:  # the model shifts the labels itself (transformers' convention)
        yield mb["input_ids"], mb["input_ids"]


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t = trainer(args, tempfile.mkdtemp(prefix="engine_overhead_"))
    plain = plain_loop(t)
    t.train_step(), plain()  # warm-up
    ours, ref = [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        t.train_step()
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain(i)
        ref.append(time.perf_counter() - t0)
    trainer_ms, plain_ms = statistics.median(ours) * 1e3, statistics.median(ref) * 1e3
    print(f"micro-batches {args.micro_batches} x {args.micro_batch} x {args.seq} tokens, hidden {args.hidden}, "
          f"{args.layers} blocks, {args.experts} experts, fp32, {torch.get_num_threads()} threads")
    print(f"trainer step {trainer_ms:.0f} ms | plain loop {plain_ms:.0f} ms")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        t.train_step()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
    print(f"trainer / plain loop: {trainer_ms / plain_ms:.3f}")
    t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
