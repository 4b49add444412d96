"""The trainer's checkpoint hooks: `CheckpointManager(...)` with resume / after_step / should_stop / finish.

It receives the objects it saves (torchtitan's CheckpointManager style): the stage module and its name
map, the optimizer, the scheduler, the data loader, a `train_state` with state_dict/load_state_dict
(the trainer's counters, `step` among them) and, optionally, the DeepSpeed engine whose step counters
travel with the checkpoint and the tokenizer that makes each checkpoint a complete transformers directory.

Config: checkpoint.every (0 = only on a stop signal), checkpoint.dir (None = <run dir>/checkpoints),
checkpoint.resume=auto|none|PATH, checkpoint.keep, model.init_from=PATH (a transformers directory),
checkpoint.data_changed=stop|continue (what a resume onto data with another fingerprint does).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jetmoe.data.config import resolve_user_path
from jetmoe.errors import JetMoEError
from jetmoe.parallel.topology import Layout
from jetmoe.training.checkpoint import contents, folders, store
from jetmoe.training.checkpoint.signals import StopSignal, report_stop

ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # the PipelineEngine's own step counters


class CheckpointManager:
    def __init__(self, cfg: DictConfig, run_dir: str | Path, *, module, global_names: dict[str, str], optimizer,
                 scheduler, loader, train_state, layout: Layout, model_config, engine=None, tokenizer=None,
                 data_fingerprint: dict | None = None) -> None:
        self.cfg = cfg
        self.module, self.global_names = module, global_names
        self.optimizer, self.scheduler, self.loader = optimizer, scheduler, loader
        self.train_state, self.engine = train_state, engine
        self.layout, self.model_config = layout, model_config
        self.tokenizer = tokenizer  # saved beside the weights, so each checkpoint is a transformers directory
        self.data_fingerprint = data_fingerprint  # stored in trainer_state extra, compared on resume
        ck = cfg.checkpoint
        self.every = int(ck.every or 0)
        self.keep = int(ck.keep or 0)
        self.comm = store.default_comm()
        root = resolve_user_path(ck.dir) if ck.dir else Path(run_dir) / "checkpoints"
        self.root = Path(self.comm.broadcast(str(root)))
        self.last_saved: int | None = None
        self.run_dir = Path(run_dir)
        self.signal = StopSignal()

    def _print(self, text: str) -> None:
        if self.comm.rank == 0:
            print(text, flush=True)

    def _contents_state(self, step: int) -> contents.TrainingState:
        extra = dict(self.train_state.state_dict())
        extra.pop("step", None)
        if self.engine is not None:
            extra.update({key: int(getattr(self.engine, key)) for key in ENGINE_COUNTERS})
        if self.data_fingerprint is not None:
            extra["data_fingerprint"] = self.data_fingerprint
        return contents.TrainingState(step=step, scheduler=self.scheduler, loader=self.loader,
                                      config=OmegaConf.to_container(self.cfg, resolve=True), extra=extra)

    # ------------------------------------------------------------------------------------------ hooks
    def resume(self) -> int:
        """Load the checkpoint that checkpoint.resume names (or model.init_from's weights); returns the
        optimizer steps already done (0 for a fresh start)."""
        spec = str(self.cfg.checkpoint.resume)
        if spec.lower() not in ("auto", "none") and not spec.startswith("/"):
            spec = str(resolve_user_path(spec))
        found, problem = None, None
        if self.comm.rank == 0:
            try:
                found = folders.resolve(spec, self.root, log=self._print)
            except JetMoEError as e:
                problem = str(e)
        found, problem = self.comm.broadcast((str(found) if found else None, problem))
        if problem:
            raise JetMoEError(problem)
        init_from = self.cfg.model.get("init_from")
        if found is None:
            if init_from:
                started = time.perf_counter()
                contents.read_weights_into(resolve_user_path(init_from), self.module, self.optimizer,
                                           global_names=self.global_names)
                self._print(f"checkpoint: initialised weights from {init_from} ({time.perf_counter() - started:.1f}s)")
            return 0
        started = time.perf_counter()
        state = self._contents_state(0)
        if not self._same_data(Path(found)):
            state.loader = None  # checkpoint.data_changed=continue: the new data's order starts at its beginning
        saved = contents.read_into(found, self.module, self.optimizer, state, self.layout,
                                   global_names=self.global_names)
        extra = saved.get("extra") or {}
        if self.engine is not None:
            for key in ENGINE_COUNTERS:
                if key in extra:
                    setattr(self.engine, key, extra[key])
        self.train_state.load_state_dict({**extra, "step": state.step})
        self.last_saved = state.step
        saved_layout, now = saved.get("layout", {}), self.layout.as_dict()
        moved = "" if saved_layout == now else f" (saved with {saved_layout}, now {now})"
        self._print(f"checkpoint: resumed from {found} at step {state.step}{moved} "
                    f"({time.perf_counter() - started:.1f}s)")
        return state.step

    def _same_data(self, found: Path) -> bool:
        """False when the checkpoint was trained on other data and checkpoint.data_changed=continue; raises
        when it was and the key says stop. Checkpoints without a fingerprint (older ones) count as the same."""
        from jetmoe.data.fingerprint import describe_change

        choice = str(self.cfg.checkpoint.get("data_changed", "stop"))
        if choice not in ("stop", "continue"):
            raise JetMoEError(f"checkpoint.data_changed={choice!r} is unknown; use stop or continue")
        saved = (folders.CheckpointReader(found).json(contents.TRAINER_STATE).get("extra") or {}).get("data_fingerprint")
        now = self.data_fingerprint
        if saved is None or now is None or saved.get("id") == now.get("id"):
            return True
        change = describe_change(saved, now)
        if choice == "stop":
            raise JetMoEError(f"checkpoint {found} was trained on other data ({change}); to keep its weights, "
                              "optimizer and step on this data pass checkpoint.data_changed=continue (the data order "
                              "restarts), or start over with checkpoint.resume=none")
        self._print(f"checkpoint: data changed since {found.name} ({change}); continuing on the new data "
                    "(checkpoint.data_changed=continue), its order from the start")
        return False

    def save(self, step: int) -> Path:
        started = time.perf_counter()
        folder = contents.save(self.root, step, self.module, self.optimizer, self._contents_state(step), self.layout,
                               model_config=self.model_config, global_names=self.global_names, keep=self.keep,
                               comm=self.comm, tokenizer=self.tokenizer)
        self.last_saved = step
        if self.comm.rank == 0:
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            self._print(f"checkpoint: saved step {step} to {folder} ({size / 2**20:.1f} MiB, "
                        f"{time.perf_counter() - started:.1f}s)")
        return folder

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.save(step)

    def should_stop(self, step: int) -> bool:
        """True once any rank received a stop signal; the step is then saved first (collective)."""
        if not self.signal.requested():
            return False
        self._print(f"checkpoint: {self.signal.name()} received; stopping after step {step}")
        if self.last_saved != step:
            self.save(step)
        if self.comm.rank == 0:
            line = report_stop(self.signal.name(), step, self.root / folders.step_dir_name(step), self.run_dir)
            if line:
                self._print(line)
        return True

    def finish(self, step: int) -> None:
        if not self.signal.received:  # after a stop, a second Ctrl-C during teardown still exits at once
            self.signal.restore()
        if self.every and self.last_saved != step and step > 0:
            self.save(step)
