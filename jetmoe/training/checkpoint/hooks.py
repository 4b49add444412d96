"""The trainer's checkpoint hooks: `CheckpointManager(trainer)` with resume / after_step /
should_stop / finish (the protocol in jetmoe/training/trainer.py).

Config: checkpoint.every (0 = only on a stop signal), checkpoint.dir (None = <run dir>/checkpoints),
checkpoint.resume=auto|none|PATH, checkpoint.keep, model.init_from=PATH (a transformers directory).
"""

from __future__ import annotations

import time
from pathlib import Path

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import contents, store
from jetmoe.training.checkpoint.signals import StopSignal


def _absolute(path: str) -> Path:
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except (ImportError, ValueError):  # no Hydra app running
        return Path(path).absolute()


class CheckpointManager:
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg
        ck = self.cfg.checkpoint
        self.every = int(ck.every or 0)
        self.keep = int(ck.keep or 0)
        self.comm = store.default_comm()
        root = _absolute(ck.dir) if ck.dir else Path(trainer.run_dir) / "checkpoints"
        self.root = Path(self.comm.broadcast(str(root)))
        self.last_saved: int | None = None
        self.signal = StopSignal()

    # ----------------------------------------------------------------------------------------- helpers
    def _print(self, text: str) -> None:
        if self.comm.rank == 0:
            print(text, flush=True)

    def _training_state(self, step: int) -> contents.TrainingState:
        from omegaconf import OmegaConf

        t, engine = self.trainer, self.trainer.engine
        extra = {
            "global_steps": int(getattr(engine, "global_steps", 0)),
            "global_samples": int(getattr(engine, "global_samples", 0)),
            "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
            "skipped_total": int(getattr(t, "skipped_total", 0)),
        }
        return contents.TrainingState(step=step, scheduler=getattr(engine, "lr_scheduler", None), loader=t.loader,
                                      config=OmegaConf.to_container(self.cfg, resolve=True), extra=extra)

    def _module(self):
        return self.trainer.parts.module

    def _names(self):
        return self.trainer.parts.global_names

    # ------------------------------------------------------------------------------------------ hooks
    def resume(self) -> int:
        t = self.trainer
        spec = str(self.cfg.checkpoint.resume)
        if spec.lower() not in ("auto", "none") and not spec.startswith("/"):
            spec = str(_absolute(spec))
        found, problem = None, None
        if self.comm.rank == 0:
            try:
                found = store.resolve(spec, self.root, log=self._print)
            except JetMoEError as e:
                problem = str(e)
        found, problem = self.comm.broadcast((str(found) if found else None, problem))
        if problem:
            raise JetMoEError(problem)
        init_from = self.cfg.model.get("init_from")
        if found is None:
            if init_from:
                started = time.perf_counter()
                contents.read_weights_into(_absolute(init_from), self._module(), t.engine.optimizer,
                                           global_names=self._names())
                self._print(f"checkpoint: initialised weights from {init_from} ({time.perf_counter() - started:.1f}s)")
            return 0
        started = time.perf_counter()
        state = self._training_state(0)
        trainer_state = contents.read_into(found, self._module(), t.engine.optimizer, state,
                                           contents.Place.of(t.layout), global_names=self._names())
        extra = trainer_state.get("extra") or {}
        engine = t.engine
        for key in ("global_steps", "global_samples", "skipped_steps"):
            if key in extra and hasattr(engine, key):
                setattr(engine, key, extra[key])
        if "skipped_total" in extra:
            t.skipped_total = extra["skipped_total"]
        self.last_saved = state.step
        saved_layout = trainer_state.get("layout", {})
        now = contents.Place.of(t.layout).describe()
        moved = "" if saved_layout == now else f" (saved with {saved_layout}, now {now})"
        self._print(f"checkpoint: resumed from {found} at step {state.step}{moved} "
                    f"({time.perf_counter() - started:.1f}s)")
        return state.step

    def save(self, step: int) -> Path:
        t = self.trainer
        started = time.perf_counter()
        folder = contents.save(self.root, step, self._module(), t.engine.optimizer, self._training_state(step),
                               contents.Place.of(t.layout), model_config=t.model_config,
                               global_names=self._names(), keep=self.keep, comm=self.comm,
                               tokenizer=getattr(getattr(t, "data", None), "tokenizer", None))
        self.last_saved = step
        if self.comm.rank == 0:
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            self._print(f"checkpoint: saved step {step} to {folder} ({size / 2**20:.1f} MiB, "
                        f"{time.perf_counter() - started:.1f}s)")
        return folder

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.save(step)

    def should_stop(self) -> bool:
        if not self.signal.requested():
            return False
        self._print(f"checkpoint: {self.signal.name()} received; stopping after step {self.trainer.step}")
        if self.last_saved != self.trainer.step:
            self.save(self.trainer.step)
        return True

    def finish(self, step: int) -> None:
        self.signal.restore()
        if self.every and self.last_saved != step and step > 0:
            self.save(step)
