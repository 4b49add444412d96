"""`train.spike.policy`: each step is judged between its gradient norm and its update, and a spike is acted on.

- `skip`: the update is not applied (weights and optimizer state stay as before the step); the step counts, its
  row says `skipped` with the spike, and the run's record lists its batch, so a resumed run skips that update too.
- `rollback`: the update is not applied either; then the newest checkpoint older than the spike is loaded into the
  running job, and the global batches of the spike's window (the spike's step and the `skip_window` steps before
  it, back to that checkpoint) are added to the run's skipped data (jetmoe.training.skipped_data), so the run
  continues as a run told to skip them from the start would. More than `max_rollbacks` spikes stop the run with
  one line; checkpoints are left as they are.

When the step is judged: DeepSpeed's optimizer (ZeRO-1 or BF16) computes the global gradient norm, then calls the
inner optimizer's step; `StepGate` wraps that call. The LM loss of the step is then complete on the last stage:
one all-reduce of one number per step gives every rank the mean, and every rank reaches the same verdict from the
same numbers (no host sync per micro-batch; with the policy off, no collective at all).
"""

from __future__ import annotations

import contextlib
import functools
import socket

import torch
import torch.distributed as dist

from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger
from jetmoe.parallel.deepspeed_internals import accumulated_train_loss, grad_norm_before_update
from jetmoe.training.skipped_data import SkippedData
from jetmoe.training.spike import Spike, SpikeDetector

logger = get_logger(__name__)


class StepGate:
    """Whether the optimizer applies this step's update: asked once per step on every rank, from inside the inner
    optimizer's step (ZeRO-1 calls it once per parameter group; the first call decides for the step). A step whose
    gradient is not finite never reaches it (DeepSpeed skips it before), so `open` stays None."""

    def __init__(self, engine, decide):
        self.decide = decide
        self.open: bool | None = None
        self.forced: bool | None = None
        inner = engine.optimizer.optimizer  # the torch optimizer DeepSpeed's wrapper steps on its fp32 partition
        update = inner.step

        @functools.wraps(update)  # keeps the marks torch's LR scheduler puts on the step it wraps
        def step(*args, **kwargs):
            if self.open is None:
                self.open = self.decide() if self.forced is None else self.forced
            return update(*args, **kwargs) if self.open else None

        inner.step = step

    def arm(self, forced: bool | None = None) -> None:
        """For the next step; forced: decided already (False: no update), without asking."""
        self.open, self.forced = None, forced

    @contextlib.contextmanager
    def closed(self):
        """No update while inside (a replay of a step)."""
        self.open, self.forced = False, False
        try:
            yield
        finally:
            self.forced = None


class SpikeGuard:
    def __init__(self, settings, engine, skipped: SkippedData, micro_batches: int, dp: int, device, alert):
        """settings: the train.spike section; micro_batches: per dp rank and step; alert(title, text): a wandb alert
        and a console warning (MetricsLogger.alert)."""
        self.settings, self.policy = settings, settings.policy
        self.engine, self.skipped, self.alert = engine, skipped, alert
        self.count, self.device = micro_batches * dp, device
        self.detector = SpikeDetector.from_settings(settings)
        self.gate = StepGate(engine, self._decide)
        self.spike: Spike | None = None
        self.recorded = False  # this step's update is one an earlier launch skipped

    def before_step(self, step: int, loader) -> None:
        """Pass over skipped data, then arm the gate for `step` (closed for an update the record says to skip)."""
        self.skipped.advance(loader, step)
        self.spike = None
        self.recorded = self.skipped.no_update(loader.consumed_samples)
        self.gate.arm(False if self.recorded else None)

    @property
    def update_skipped(self) -> bool:
        return self.spike is not None or self.recorded

    def _decide(self) -> bool:
        if self.policy == "off":
            return True
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        loss = accumulated_train_loss(self.engine)
        if loss is not None:
            total += loss.detach().to(torch.float64).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)  # the last stage of each dp replica holds its micro-batches' sum
        lm_loss = float(total) / self.count
        norm = grad_norm_before_update(self.engine.optimizer)
        norm = float(norm) if norm is not None else None
        self.spike = self.detector.check(lm_loss, norm)
        if self.spike is None:
            self.detector.record(lm_loss, norm)
        return self.spike is None

    @property
    def rollback_due(self) -> bool:
        return self.spike is not None and self.policy == "rollback"

    def after_step(self, step: int) -> dict:
        """The step's row additions when its update was skipped; under policy skip, the skip is recorded (run
        directory, alert). Under rollback the trainer calls roll_back next."""
        if self.recorded:
            return {"skipped": True, "skip_reason": "spike (recorded)"}
        if self.spike is None:
            return {}
        fields = {"skipped": True, "skip_reason": "spike", "spike": self.spike.as_dict()}
        if self.policy == "skip":
            fields["alerts"] = [self._record_skip(step)]
        return fields

    def _record_skip(self, step: int) -> str:
        samples = self.skipped.batches_of(step, step)
        self.skipped.add_no_update({"policy": "skip", "step": step, "samples": samples,
                                    "spike": self.spike.as_dict(), "host": socket.gethostname()})
        text = f"loss spike at step {step} ({self.spike.describe()}); its update was skipped (samples {samples})"
        self.alert("jetmoe: loss spike skipped", text)
        return text

    def roll_back(self, step: int, checkpoint) -> dict:
        """After `step` was judged a spike under policy rollback: load the newest checkpoint before it and pass over
        the window's data from now on. Returns row fields: `rollback` (the event) for the next step's row; without
        it, no checkpoint was older than the step, which is then recorded as a skipped update (as under policy
        skip) and the fields belong to its own row. Collective."""
        spike, s = self.spike, self.settings
        if self.skipped.rollbacks >= s.max_rollbacks:
            raise JetMoEError(f"loss spike at step {step} ({spike.describe()}) after {self.skipped.rollbacks} "
                              f"rollbacks, the most train.spike.max_rollbacks={s.max_rollbacks} allows; checkpoints "
                              f"are untouched, see {self.skipped.path.name}; raise the limit or lower train.lr")
        restored = checkpoint.roll_back(step)
        if restored is None:
            return {"alerts": [self._record_skip(step)]}
        first = max(restored + 1, step - s.skip_window)
        samples = self.skipped.batches_of(first, step)
        event = {"policy": "rollback", "step": step, "checkpoint_step": restored, "steps": [first, step],
                 "samples": samples, "spike": spike.as_dict(), "host": socket.gethostname()}
        self.skipped.add_rollback(event)
        text = (f"loss spike at step {step} ({spike.describe()}); rolled back to step {restored}, skipping samples "
                f"{samples} (the batches of steps {first}-{step})")
        self.alert("jetmoe: loss spike rolled back", text)
        self.spike = None
        return {"rollback": event, "alerts": [text]}
