"""TensorBoard as a second logger (`logging.tensorboard=true`): the scalars wandb gets, by step, in
`<run dir>/tensorboard`, and the samples as text."""

from __future__ import annotations

from pathlib import Path

from jetmoe.errors import JetMoEError


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise JetMoEError("logging.tensorboard=true needs the tensorboard package; pip install tensorboard "
                              "or set logging.tensorboard=false") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, scalars: dict) -> None:
        """`scalars`: wandb's flattened row (numbers and booleans by name), `step` among them."""
        step = int(scalars["step"])
        for key, value in scalars.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def log_samples(self, records: list[dict]) -> None:
        text = "\n\n".join(f"**{r['kind']}** `{r['prompt']}` → {r['text']}" for r in records)
        self.writer.add_text("samples", text, int(records[0]["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
