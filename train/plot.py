#!/usr/bin/env python
"""Render a run's curves to PNG: `python train/plot.py RUN_DIR [--out DIR]`.

Writes losses.png (LM loss, eval loss and aux loss on one figure, aux on a second axis), lr.png,
throughput.png (tokens/s) and expert_load.png (share of tokens per expert, per layer, as heatmaps for
MoA and MoE at the last step with router statistics). Reads only RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

from jetmoe.log import get_logger

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = get_logger("plot")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist; give a run directory written by train/pretrain.py")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
    if not rows:
        raise SystemExit(f"error: {path} has no rows yet")
    return rows


def series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_losses(rows, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*series(rows, "lm_loss"), label="LM loss", color="tab:blue")
    steps, evals = series(rows, "eval_loss")
    if evals:
        ax.plot(steps, evals, "o-", label="eval loss", color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats)")
    aux_ax = ax.twinx()
    aux_ax.plot(*series(rows, "aux_loss"), label="aux loss", color="tab:red", alpha=0.8)
    aux_ax.set_ylabel("aux loss")
    lines = ax.get_lines() + aux_ax.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], loc="upper right")
    ax.set_title("LM loss and router aux loss")
    return _save(fig, out / "losses.png")


def plot_single(rows, key, label, out: Path, name: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(*series(rows, key))
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(label)
    return _save(fig, out / name)


def plot_expert_load(rows, out: Path) -> Path | None:
    last = next((r for r in reversed(rows) if r.get("router")), None)
    if last is None:
        return None
    router = last["router"]
    kinds = [key.removeprefix("share_") for key in router if key.startswith("share_")]  # the rows name the routers
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        share = router[f"share_{kind}"]
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{kind} experts")
        fig.colorbar(image, ax=ax, label="share of routed tokens")
    fig.suptitle(f"expert load at step {last['step']}")
    return _save(fig, out / "expert_load.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    rows = read_rows(args.run_dir)
    out = args.out or args.run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_losses(rows, out), plot_single(rows, "lr", "learning rate", out, "lr.png"),
               plot_single(rows, "tokens_per_sec", "tokens/s", out, "throughput.png"),
               plot_expert_load(rows, out)]
    for path in written:
        if path is not None:
            logger.info(str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
