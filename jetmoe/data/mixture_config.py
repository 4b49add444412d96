"""`data=mixture`: named sources with weights, and an optional phase schedule of weights.

    sources: {web: {path: /data/rw/*.parquet, text_field: content, weight: 0.7}, code: {...}}
    phases:  [{start_step: 0, weights: {web: 0.7, code: 0.3}}, {start_step: 250000, weights: {...}}]

`start_step` counts optimizer steps already done: a phase with start_step k first applies to the step
logged as k + 1. Without `phases`, the sources' own weights hold for the whole run. Weights are
relative (they need not sum to 1); a name a phase leaves out has weight 0 in that phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from jetmoe.errors import JetMoEError

SOURCE_KEYS = ("path", "text_field", "weight", "hub_config", "split", "txt_sample_by")
WEIGHT_SCALE = 10**9  # weights become integers at this resolution, so the schedule is exact arithmetic


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: Any  # a file, glob (`**` allowed), directory or list of them; or a hub dataset name
    text_field: str = "text"
    weight: float = 1.0
    hub_config: Optional[str] = None
    split: str = "train"
    txt_sample_by: str = "document"


@dataclass(frozen=True)
class Phase:
    start_step: int
    weights: tuple[int, ...]  # integer weights (x WEIGHT_SCALE), one per source in MixtureSpec.names order


@dataclass(frozen=True)
class MixtureSpec:
    sources: tuple[SourceSpec, ...]  # sorted by name: the order never depends on how the config was written
    phases: tuple[Phase, ...]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def phase_at(self, step: int) -> int:
        """Index of the phase that step `step` (0-based: `step` optimizer steps already done) belongs to."""
        index = 0
        for i, phase in enumerate(self.phases):
            if phase.start_step <= step:
                index = i
        return index

    def describe(self) -> list[dict]:
        return [{"start_step": p.start_step,
                 "weights": {n: w / sum(p.weights) for n, w in zip(self.names, p.weights) if w}}
                for p in self.phases]


def _weight(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JetMoEError(f"{where}={value!r} is not a number; give a weight >= 0")
    if value < 0:
        raise JetMoEError(f"{where}={value} is negative; give a weight >= 0")
    scaled = round(value * WEIGHT_SCALE)
    if value > 0 and scaled == 0:  # it would silently draw nothing
        raise JetMoEError(f"{where}={value} is below the smallest weight a mixture represents ({1 / WEIGHT_SCALE:g}, "
                          f"weights are kept in integer steps of it); give at least {1 / WEIGHT_SCALE:g}, or 0 to "
                          f"leave the source out")
    return scaled


def _plain(node) -> Any:
    if node is None or isinstance(node, (dict, list, str, int, float, bool)):
        return node
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def parse_mixture(sources, phases) -> MixtureSpec:
    """Check `data.sources` and `data.phases`; every mistake is one JetMoEError line naming the key."""
    sources, phases = _plain(sources), _plain(phases)
    if not isinstance(sources, dict) or not sources:
        raise JetMoEError("data.sources is empty; data=mixture needs data.sources.<name>={path: ..., weight: ...}")
    specs = []
    for name in sorted(sources):
        entry = sources[name]
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise JetMoEError(f"data.sources.{name} must be a mapping {{path, text_field, weight}}, got {entry!r}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise JetMoEError(f"data.sources.{name}: unknown key(s) {unknown}; known: {list(SOURCE_KEYS)}")
        if not entry.get("path"):
            raise JetMoEError(f"data.sources.{name}.path is not set; give a file, glob or directory")
        _weight(entry.get("weight", 1.0), f"data.sources.{name}.weight")
        specs.append(SourceSpec(name=str(name), **{k: v for k, v in entry.items() if v is not None or k == "hub_config"}))
    names = [s.name for s in specs]
    if not phases:
        weights = tuple(_weight(s.weight, f"data.sources.{s.name}.weight") for s in specs)
        parsed = [Phase(0, weights)]
        where = ["data.sources.*.weight"]
    else:
        if not isinstance(phases, list):
            raise JetMoEError(f"data.phases must be a list of {{start_step, weights}}, got {phases!r}")
        parsed, where = [], []
        for i, phase in enumerate(phases):
            if not isinstance(phase, dict) or set(phase) != {"start_step", "weights"}:
                raise JetMoEError(f"data.phases[{i}] must be {{start_step: N, weights: {{name: w}}}}, got {phase!r}")
            start, weights = phase["start_step"], phase["weights"]
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise JetMoEError(f"data.phases[{i}].start_step={start!r} must be a non-negative integer")
            if not isinstance(weights, dict):
                raise JetMoEError(f"data.phases[{i}].weights must map source names to weights, got {weights!r}")
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise JetMoEError(f"data.phases[{i}] names unknown source(s) {unknown}; sources: {names}")
            parsed.append(Phase(start, tuple(_weight(weights.get(n, 0), f"data.phases[{i}].weights.{n}")
                                             for n in names)))
            where.append(f"data.phases[{i}].weights")
        if parsed[0].start_step != 0:
            raise JetMoEError(f"data.phases[0].start_step={parsed[0].start_step}; the first phase must start at 0")
        for i in range(1, len(parsed)):
            if parsed[i].start_step <= parsed[i - 1].start_step:
                raise JetMoEError(
                    f"data.phases[{i}].start_step={parsed[i].start_step} does not increase "
                    f"(previous phase starts at {parsed[i - 1].start_step})")
    for phase, key in zip(parsed, where):
        if not any(phase.weights):
            raise JetMoEError(f"{key} are all zero; give at least one source a positive weight")
    return MixtureSpec(tuple(specs), tuple(parsed))
