"""Several registered purification methods run one after the other on the same clean data.

``Sequence(steps=("detect-unlearn", "act-clip"))`` purifies with the first method, hands the
result to the second, and so on; each step is the registered method with its own presets (plus
``options[step]``), sees the whole clean set (so each splits off the same hold-out, seeded alike)
and never test data. Every step's task and model checks run before the first step computes.
The report lists each step's report under ``steps``, keeps the per-epoch records of all of them
(each labelled with its ``step``), sums their times, and lifts their method-specific fields to the
top (a later step's field wins a clash), so e.g. ``detect-unlearn``'s detector ``rounds`` read as
they do for that method alone. A step named in ``optional`` that refuses the model (e.g. clipping a
model that calls ``torch.nn.functional.relu`` instead of ReLU modules, or one without convolutional
feature maps), before it starts or when it starts, is left out and listed with its reason under
``skipped_steps``; the model goes on to the next step as the previous one left it.

Registered as ``sequence`` (name the ``steps``), ``detect-unlearn-clip`` = ``detect-unlearn`` then
``act-clip`` (optional) (issue 19's candidate 4g, ``docs/default-purifier-devlog.md``), and
``detect-unlearn-clip-all``, the same with every activation module bounded (candidate 4h, fipurify's
default purifier for images).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..tasks import Task
from ..validation import as_dataset
from .base import DEFENSES, Defense, EpochCallback, Options, labelled

_COMMON = {"method", "config", "n_clean_train", "n_holdout", "n_trainable", "seconds", "history"}


@dataclass
class SequenceConfig(Options):
    """``steps``: registered method names, run in order; ``options``: ``{step: {option: value}}``
    for any of them; ``optional``: steps that are left out (the report says why) when they refuse the
    model or its task, instead of refusing the whole sequence; ``seed``: given to every step.
    Any other option (e.g. ``epochs`` from the CLI's ``--epochs``) goes, as ``shared``, to every step
    whose config has that field (``options[step]`` wins over it); one that no step has is refused."""
    steps: tuple[str, ...] = ()
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    optional: tuple[str, ...] = ()
    seed: int = 0
    shared: dict[str, Any] = field(default_factory=dict)

    def updated(self, **overrides: Any) -> "SequenceConfig":
        own = {f.name for f in fields(self)}
        extra = {k: v for k, v in overrides.items() if k not in own}
        mine = {k: v for k, v in overrides.items() if k in own}
        if extra:
            mine["shared"] = {**self.shared, **mine.get("shared", {}), **extra}
        return super().updated(**mine)

    def validate(self) -> "SequenceConfig":
        if not self.steps:
            raise ConfigError("a sequence needs at least one step (a registered method name)")
        for s in self.steps:
            if DEFENSES.entry(s).obj is Sequence:  # entry() raises the registry's one-line error if unknown
                raise ConfigError(f"step {s!r} is itself a sequence; list its steps instead")
        known = set().union(*(step_fields(s) for s in self.steps))
        stray = sorted(set(self.shared) - known)
        if stray:
            raise ConfigError(f"unknown option(s) for {', '.join(self.steps)}: {', '.join(stray)}; "
                              f"known: {', '.join(sorted(known))}")
        for what, names in (("options given", self.options), ("optional", self.optional)):
            stray = sorted(set(names) - set(self.steps))
            if stray:
                raise ConfigError(f"{what} for {', '.join(stray)}, which is not a step of {list(self.steps)}")
        return self

    def _coerce(self, overrides: dict[str, Any]) -> None:
        for key in ("steps", "optional"):
            if key in overrides and overrides[key] is not None:
                overrides[key] = tuple(str(s) for s in overrides[key])

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "options": {k: dict(v) for k, v in self.options.items()},
                "optional": list(self.optional), "seed": self.seed, "shared": dict(self.shared)}


def step_fields(name: str) -> set[str]:
    """The option names the registered method ``name``'s config takes."""
    return {f.name for f in fields(DEFENSES.entry(name).obj.config_class)}


class Sequence(Defense):
    """Registered methods one after the other (see module doc)."""

    name = "sequence"
    summary = {"sequence": "registered methods one after the other (`--set steps='[\"ft\", \"act-clip\"]'`)",
               "detect-unlearn-clip": "`detect-unlearn`, then `act-clip` (activation clipping, always acting)",
               "detect-unlearn-clip-all": "fipurify's default for images: `detect-unlearn`, then `act-clip` on every "
                                          "activation (`layers` 1.0), picked by the clean-data rules"}
    config_class = SequenceConfig  # type: ignore[assignment]
    config: SequenceConfig  # type: ignore[assignment]

    def make_steps(self) -> list[Defense]:
        """The configured step defenses (each with its registered presets, the ``shared`` options it takes,
        ``options[step]`` and the seed)."""
        from .registry import create  # the registry imports this module

        cfg = self.config
        out = []
        for s in cfg.steps:
            shared = {k: v for k, v in cfg.shared.items() if k in step_fields(s)}
            out.append(create(s, **{**shared, **cfg.options.get(s, {}), "seed": cfg.seed}))
        return out

    def purify(self, model: nn.Module, clean_data: Dataset | DataLoader, *, task: Task | str | None = None,
               progress: bool = True, callback: EpochCallback | None = None) -> nn.Module:
        t_start = time.perf_counter()
        source = task if task is not None else as_dataset(clean_data)
        skipped: dict[str, str] = {}

        def refused(name: str, e: ConfigError) -> None:
            """An optional step's refusal is recorded and the step left out; any other's is raised."""
            if name not in self.config.optional:
                raise e
            skipped[name] = str(e)

        def nothing_left() -> ConfigError:
            return ConfigError(f"no step of {list(self.config.steps)} can act on this model: "
                               + "; ".join(skipped.values()))

        runs: list[tuple[str, Defense]] = []
        for name, d in zip(self.config.steps, self.make_steps()):  # every refusal before any compute
            try:
                d.use_task(source)
                d.check_model(model)
                runs.append((name, d))
            except ConfigError as e:
                refused(name, e)
        if not runs:
            raise nothing_left()
        self.task = runs[0][1].task
        done: list[tuple[str, dict[str, Any]]] = []  # (step, its report)
        for name, d in runs:
            try:
                model = d.purify(model, clean_data, task=task, progress=progress,
                                 callback=labelled(callback, "step", name))
            except ConfigError as e:  # a refusal only the step's own start can see (e.g. no feature maps)
                refused(name, e)
                continue
            for rec in d.report.get("history", []):
                rec.setdefault("step", name)
            done.append((name, d.report))
        if not done:
            raise nothing_left()
        reports = [r for _, r in done]
        seconds: dict[str, float] = {"total": time.perf_counter() - t_start}
        seconds["train"] = sum(r["seconds"].get("train", 0.0) for r in reports)
        for name, r in done:
            seconds[name] = r["seconds"]["total"]
        lifted: dict[str, Any] = {}
        for r in reports:
            lifted.update({k: v for k, v in r.items() if k not in _COMMON})
        self.report = {"method": self.method_name(), "config": self.config.to_dict(),
                       "n_clean_train": reports[-1]["n_clean_train"], "n_holdout": reports[-1]["n_holdout"],
                       "n_trainable": sum(r["n_trainable"] for r in reports), **lifted,
                       "steps": [{k: v for k, v in r.items() if k != "history"} for r in reports],
                       "skipped_steps": skipped,
                       "seconds": seconds, "history": [h for r in reports for h in r.get("history", [])]}
        return model


DEFENSES.register("sequence", Sequence)
DEFENSES.register("detect-unlearn-clip", Sequence, steps=("detect-unlearn", "act-clip"), optional=("act-clip",))
DEFENSES.register("detect-unlearn-clip-all", Sequence, steps=("detect-unlearn", "act-clip"), optional=("act-clip",),
                  options={"act-clip": {"layers": 1.0}})
