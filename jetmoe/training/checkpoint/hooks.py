"""The trainer's checkpoint hooks: `CheckpointManager(...)` with resume / after_step / should_stop / finish.

It receives what it saves (torchtitan's CheckpointManager style): the model parts written as tensor files
(`ModelParts`: the stage module and its name map, the optimizer, the layout, and the model config and tokenizer
that make each checkpoint a complete transformers directory) and a registry of named states, each with
state_dict/load_state_dict: the scheduler, the data loader ("data"), the trainer's counters ("trainer", `step`
among them), the DeepSpeed engine's counters ("engine").

Settings: the `checkpoint` section: every (0 = only on a stop signal), dir (None = <run dir>/checkpoints),
resume=auto|none|PATH, keep, keep_every, verify=full|size, async (null = on with CUDA), data_changed=stop|continue
(what a resume onto other data, data order or past mixture does), fresh_start=refuse|move_aside (what resume=none
does where a run's checkpoints are); and model.init_from=PATH (a transformers directory). What else may change on
resume, what is refused and what is applied: resume_rules.

Asynchronous saves: `save` blocks only while the tensors are copied to host buffers; a thread writes,
hashes and fsyncs them. The save is committed (manifest, rename, `latest`) at the first step boundary
where every rank's thread has finished (one tiny all-reduce per step while a save is in flight), or
before the next save, a stop or the end. A crash before that leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from jetmoe.errors import JetMoEError, ResumeMismatch
from jetmoe.log import get_logger
from jetmoe.parallel.topology import Layout
from jetmoe.paths import resolve_user_path
from jetmoe.training.checkpoint import contents, folders, fresh_start, rank_files, resume_rules, store
from jetmoe.training.checkpoint.signals import StopSignal, report_stop

logger = get_logger(__name__)


@dataclass
class ModelParts:
    """What a checkpoint writes as tensor files (every rank its own part) and the folder's transformers files."""

    module: object  # this rank's stage
    optimizer: object
    layout: Layout
    global_names: dict[str, str]  # local parameter name -> transformers' name
    model_config: object = None  # config.json, generation_config.json
    tokenizer: object = None  # the tokenizer files: each checkpoint is a complete transformers directory


class CheckpointManager:
    def __init__(self, settings, run_dir: str | Path, parts: ModelParts, states: dict[str, contents.Stateful], *,
                 init_from: str | None = None, data_fingerprint: dict | None = None, record: dict | None = None):
        """settings: the `checkpoint` section; states: the named states saved and restored (the trainer's counters
        under "trainer", with its `step`); init_from: model.init_from; data_fingerprint: stored with each checkpoint
        and compared on resume; record: the resolved run config, stored for the record."""
        self.settings, self.parts, self.states = settings, parts, dict(states)
        self.init_from, self.data_fingerprint, self.record = init_from, data_fingerprint, record
        self.every, self.keep, self.keep_every, self.verify = settings.every, settings.keep, settings.keep_every, \
            settings.verify
        background = settings.async_
        self.background = any(p.is_cuda for p in parts.module.parameters()) if background is None else background
        self.pending = None  # (writer, files, step, started) of an asynchronous save not yet committed
        self.comm = store.default_comm()
        root = folders.checkpoint_root(settings, run_dir)
        self.root = Path(self.comm.broadcast(str(root)))
        self.launch = self.comm.broadcast(uuid.uuid4().hex[:8])  # names this launch's staging folders
        self.verifier = None  # rank 0: the thread verifying earlier launches' checkpoints for pruning
        if self.every:  # the expert groups' gloo twins exist before the first save's blocking part
            rank_files.create_host_groups(parts.module, parts.global_names)
        self.run_dir = Path(run_dir)
        self.last_saved: int | None = None
        self._data_restarts = False  # checkpoint.data_changed=continue took effect: the data follows the step
        self.streak = 0  # the trainer's count of non-finite steps in a row at the last step boundary
        # the newest checkpoint of a finite step: a save taken inside a streak of skipped steps never prunes it
        self.last_finite: Path | None = None
        self.signal = StopSignal()

    def _contents_state(self, step: int) -> contents.TrainingState:
        extra = {"data_fingerprint": self.data_fingerprint} if self.data_fingerprint is not None else {}
        return contents.TrainingState(step=step, states=self.states, config=self.record, extra=extra)

    # ------------------------------------------------------------------------------------------ hooks
    def resume(self) -> int:
        """Load the checkpoint that checkpoint.resume names (or model.init_from's weights); returns the
        optimizer steps already done (0 for a fresh start). Rank 0 picks the newest checkpoint whose
        file sizes match its manifest; then every rank reads and verifies only its own part. If any rank
        finds a file altered, `auto` falls back to the next older checkpoint. Then, with checkpoint.keep,
        rank 0 hash-verifies earlier launches' checkpoints in a thread, for pruning (folders.prune)."""
        step = self._resume()
        if self.comm.rank == 0 and self.keep > 0 and self.verifier is None:
            self.verifier = folders.verify_in_background(self.root)
        return step

    def roll_back(self, before_step: int) -> int | None:
        """Load the newest intact checkpoint older than `before_step` into this running job (a loss-spike
        rollback): weights, optimizer and every named state. Returns its step, None when there is none. Collective."""
        self.commit_pending()

        def pick():
            older = [f for f in folders.list_checkpoints(self.root) if int(f.name.split("_")[-1]) < before_step]
            return next((f for f in older if not folders.verify(f, hashes=False)), None)

        found = self._agree(pick)
        return None if found is None else self._resume(str(found))

    def _resume(self, spec: str | None = None) -> int:
        spec = str(self.settings.resume) if spec is None else spec
        if spec.lower() not in ("auto", "none") and not spec.startswith("/"):
            spec = str(resolve_user_path(spec))
        self._agree(lambda: folders.check_writable(self.root))  # not at the first save, hours later
        found = self._agree(lambda: folders.resolve(spec, self.root, hashes=False))
        parts = self.parts
        if found is None:  # a fresh start: never on top of an earlier launch's checkpoints or rows
            self._agree(lambda: fresh_start.prepare(self.run_dir, self.root, spec, self.settings.fresh_start,
                                                    logger.info))
            if self.init_from:
                started = time.perf_counter()
                contents.read_weights_into(resolve_user_path(self.init_from), parts.module, parts.optimizer,
                                           global_names=parts.global_names)
                logger.info(f"checkpoint: initialised weights from {self.init_from} "
                            f"({time.perf_counter() - started:.1f}s)")
            return 0
        while True:
            started = time.perf_counter()
            state = self._contents_state(0)
            self._data_restarts = False
            problem = refusal = None
            try:
                saved = contents.read_into(found, parts.module, parts.optimizer, state, parts.layout,
                                   global_names=parts.global_names, verify=self.verify, finish=False,
                                   check=lambda saved: self._check_resume(Path(found), saved, state))
            except ResumeMismatch as e:  # the config's, not the bytes': no fallback, nothing written
                refusal = str(e)
            except JetMoEError as e:  # what verification found in the bytes: damage
                problem = str(e)
            reports = self.comm.gather((problem, refusal))
            first = lambda i: next((r[i] for r in reports if r[i]), None)  # noqa: E731
            problem, refusal = self.comm.broadcast((first(0), first(1)) if reports else None)
            if refusal is not None:
                raise JetMoEError(refusal if Path(found).name in refusal else f"cannot resume from {found}: {refusal}")
            if problem is None:
                contents.finish_load(parts.optimizer)
                break
            if spec.lower() != "auto":
                raise JetMoEError(f"checkpoint {found} is damaged: {problem}; pass an earlier checkpoint")
            failed = Path(found)
            found = self._agree(lambda: self._older_intact(failed, problem))
            if found is None:
                logger.info(f"checkpoint: {failed.name} is damaged ({problem})")
                raise folders.every_checkpoint_damaged(self.root)
        if self._data_restarts:  # checkpoint.data_changed=continue: the new data from this step on
            self.states["data"].start_at_step(state.step)
        self._apply_schedule()
        elapsed = time.perf_counter() - started
        self.last_saved, self.last_finite = state.step, Path(found)
        saved_layout, now = saved.get("layout", {}), parts.layout.as_dict()
        moved = "" if saved_layout == now else f" (saved with {saved_layout}, now {now})"
        read = self.comm.gather(state.bytes_read)
        if self.comm.rank == 0:
            total = sum(m["size"] for m in folders.load_manifest(found)["files"].values())
            share = total / self.comm.world_size
            logger.info(f"checkpoint: resumed from {found} at step {state.step}{moved} ({elapsed:.1f}s, "
                        f"verify={self.verify}); bytes read per rank: max {max(read)}, share {share:.0f} "
                        f"({max(read) / share:.2f}x)")
        return state.step

    def _check_resume(self, found: Path, saved: dict, state: contents.TrainingState) -> None:
        """Before any tensor is read (every rank, trainer_state.json verified): the resume rules
        (resume_rules; README). A refusal raises ResumeMismatch; a data change with checkpoint.data_changed=continue
        drops the data position, which then follows the step."""
        from jetmoe.data.fingerprint import describe_change

        refusal = resume_rules.refused_change(saved.get("config"), self.record, found)
        if refusal:
            raise ResumeMismatch(refusal)
        step = int(saved["step"])
        before = (saved.get("extra") or {}).get("data_fingerprint")
        now = self.data_fingerprint
        change = None
        if before is not None and now is not None and before.get("id") != now.get("id"):
            change = (f"checkpoint {found} was trained on other data ({describe_change(before, now)}); to keep its "
                      f"weights, optimizer and step on this data pass checkpoint.data_changed=continue (this data from "
                      f"step {step} on), or train on it in a new run directory")
        loader = state.states.get("data")
        if change is None and saved.get("data") is not None and hasattr(loader, "check_resume"):
            try:
                loader.check_resume(saved["data"])
            except ResumeMismatch as e:
                change = str(e)
        if change is not None:
            if self.settings.data_changed != "continue":
                raise ResumeMismatch(change)
            state.states.pop("data", None)
            self._data_restarts = True
            logger.info(f"checkpoint: the data differs from {found.name}'s ({change.split(';')[0]}); continuing on "
                        f"this data from step {step} (checkpoint.data_changed=continue)")
        applied = resume_rules.applied_changes(saved.get("config"), self.record)
        if applied:
            logger.info(f"checkpoint: applied on resume (changed since {found.name}): {', '.join(applied)}")

    def _apply_schedule(self) -> None:
        """This run's peak lr and schedule from the resumed step on (the resume rules: applied, never ignored)."""
        scheduler = self.states.get("scheduler")
        lr = ((self.record or {}).get("train") or {}).get("lr")
        if scheduler is None or lr is None or self.parts.optimizer is None \
                or not hasattr(scheduler, "lr_lambdas"):
            return
        resume_rules.apply_peak_lr(scheduler, lr)

    def _agree(self, pick):
        """Rank 0 runs pick() -> folder or None (JetMoEError: the problem); every rank gets the answer."""
        found, problem = None, None
        if self.comm.rank == 0:
            try:
                found = pick()
            except JetMoEError as e:
                problem = str(e)
        found, problem = self.comm.broadcast((str(found) if found else None, problem))
        if problem:
            raise JetMoEError(problem)
        return Path(found) if found else None

    def _older_intact(self, failed: Path, problem: str):
        older = [f for f in folders.list_checkpoints(failed.parent) if f.name < failed.name]
        for folder in older:
            if not folders.verify(folder, hashes=False):
                logger.info(f"checkpoint: {failed.name} is damaged ({problem}); falling back to {folder.name}")
                return folder
        return None

    # ------------------------------------------------------------------------------------------ saving
    def save(self, step: int, background: bool = False) -> Path:
        """Save step `step`. background: return once the tensors are on the host; the files are written
        in a thread and committed later (commit_pending). Collective."""
        if self.pending is not None:
            writer, _, pending_step, _, _ = self.pending
            if writer.writing():
                waited = time.perf_counter()
                writer.wait()
                logger.info(f"checkpoint: step {step} waited {time.perf_counter() - waited:.1f}s for the "
                            f"save of step {pending_step} to finish writing")
            self.commit_pending()
        started = time.perf_counter()
        writer = store.CheckpointWriter(self.root, step, self.comm, self.launch)
        parts = self.parts
        files = contents.write(writer, parts.module, parts.optimizer, self._contents_state(step), parts.layout,
                               model_config=parts.model_config, global_names=parts.global_names,
                               tokenizer=parts.tokenizer, background=background)
        self.last_saved = step
        finite = self.streak == 0
        if background:
            self.blocked_s = time.perf_counter() - started
            self.pending = (writer, files, step, started, finite)
            logger.info(f"checkpoint: step {step} copied to host in {self.blocked_s:.2f}s; writing in the background")
            return writer.final
        return self._commit(writer, files, step, started, finite)

    def commit_pending(self) -> Path | None:
        """Commit the asynchronous save in flight, waiting for every rank's writes. Collective."""
        if self.pending is None:
            return None
        writer, files, step, started, finite = self.pending
        self.pending = None
        return self._commit(writer, files, step, started, finite)

    def drain(self) -> Path | None:
        """Before a stop on an error every rank sees (non-finite steps): commit the save in flight. Returns
        the newest checkpoint of a finite step. Collective."""
        self.commit_pending()
        return self.last_finite

    def _commit(self, writer, files, step: int, started: float, finite: bool) -> Path:
        folder = writer.commit(files, keep=self.keep, keep_every=self.keep_every,
                               unknown="skip" if self.verifier is not None else "verify",
                               also_keep=None if finite else self.last_finite)
        if finite:
            self.last_finite = folder
        written = self.comm.gather(writer.bytes_written)
        if self.comm.rank == 0:
            mean = sum(written) / len(written)
            logger.info(f"checkpoint: saved step {step} to {folder} ({sum(written) / 2**20:.1f} MiB, "
                        f"{time.perf_counter() - started:.1f}s; busiest rank wrote {max(written) / max(mean, 1):.2f}x "
                        f"the mean)")
        return folder

    def after_step(self, step: int, skipped_in_a_row: int = 0) -> None:
        """skipped_in_a_row: the trainer's count of consecutive non-finite steps ending at `step`."""
        self.streak = skipped_in_a_row
        if self.pending is not None and self.comm.all_true(not self.pending[0].writing()):
            self.commit_pending()
        if self.every and step % self.every == 0:
            self.save(step, background=self.background)

    def should_stop(self, step: int) -> bool:
        """True once any rank received a stop signal; the step is then saved first (collective)."""
        if not self.signal.requested():
            return False
        logger.info(f"checkpoint: {self.signal.name()} received; stopping after step {step}")
        if self.last_saved != step:
            self.save(step)
        self.commit_pending()
        if self.comm.rank == 0:
            line = report_stop(self.signal.name(), step, self.root / folders.step_dir_name(step), self.run_dir)
            if line:
                logger.info(line)
        return True

    def finish(self, step: int) -> None:
        if not self.signal.received:  # after a stop, a second Ctrl-C during teardown still exits at once
            self.signal.restore()
        if self.every and self.last_saved != step and step > 0:
            self.save(step)
        self.commit_pending()
        if self.verifier is not None:  # the run ends with `keep` honoured, whatever the verifier had reached
            self.verifier.join()
            folders.prune(self.root, self.keep, self.keep_every)
