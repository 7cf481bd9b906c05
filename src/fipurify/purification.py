"""One purification run: the defense on clean data, the model evaluated before and after, DER.

This is the one purify path: the CLI (``fipurify purify``), the benchmark runner
(:func:`fipurify.bench.stages.purify`) and the benchmark scripts all call
:func:`purify_model`. Each caller keeps its own extras outside it (the CLI's input checks,
logging and files; the runner's memory meter, clean validation accuracy and capacity
check) or passes them in as hooks (``verify``, ``meter``, ``callback``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import defenses
from .defenses.base import Defense, EpochCallback
from .metrics import defense_effectiveness_rate
from .workflow import DataBundle, evaluate_saved

#: A verify hook: called with ``(model, clean)`` before purifying (so bad clean data fails before
#: any training), it returns the check to run on the purified model; that check's dict is
#: reported as ``"detector"`` (e.g. ``lambda m, c: PurificationCheck(m, c).after``).
VerifyHook = Callable[[nn.Module, Dataset], Callable[[nn.Module], dict[str, Any]]]


@dataclass
class Purification:
    """The outcome of :func:`purify_model`.

    ``report`` is ``{"clean_size", **defense.report}`` plus ``"detector"`` (with a verify hook)
    and ``"before"``, ``"after"`` and ``"der"`` (with evaluation data; DER is None for a model
    without a backdoor test set). ``wall_seconds`` is the wall time of the defense alone.
    """
    model: nn.Module
    defense: Defense
    report: dict[str, Any]
    wall_seconds: float

    @property
    def before(self) -> dict[str, Any] | None:
        return self.report.get("before")

    @property
    def after(self) -> dict[str, Any] | None:
        return self.report.get("after")

    @property
    def der(self) -> float | None:
        return self.report.get("der")


def defense_for(method: str, dataset: str | None = None, **options: Any) -> Defense:
    """The registered defense ``method`` with ``options``, on ``dataset``'s paper preset where one exists
    (the FIP family's schedule; other datasets and ``None`` get the method's defaults)."""
    preset = dataset if dataset in defenses.PAPER_PRESETS else None
    return defenses.create(method, dataset=preset, **options)


def purify_model(model: nn.Module, metadata: dict[str, Any], defense: Defense | str,
                 clean: Dataset | DataLoader, *, options: dict[str, Any] | None = None,
                 test: DataBundle | None = None, before: dict[str, Any] | None = None,
                 verify: VerifyHook | None = None, progress: bool = False,
                 callback: EpochCallback | None = None,
                 meter: Callable[[], ContextManager[Any]] | None = None) -> Purification:
    """Purify ``model`` (left unchanged) with ``defense`` on ``clean``; evaluate it before and after.

    ``defense`` is a configured :class:`~fipurify.defenses.Defense`, or a method name built
    with ``options`` on the preset of the dataset ``metadata`` records (:func:`defense_for`).
    ``test`` (a :class:`~fipurify.workflow.DataBundle`; its test split and the attack recorded
    in ``metadata`` are used) turns on the evaluation: ``after`` always, ``before`` unless
    given (e.g. the metrics recorded at training time); both are measured after purifying.
    ``verify`` runs a detector before and after (:data:`VerifyHook`). ``meter`` is a context
    manager factory wrapped around the defense call alone (timing, memory).
    """
    if isinstance(defense, str):
        defense = defense_for(defense, (metadata.get("dataset") or {}).get("name"), **(options or {}))
    elif options:
        raise TypeError("options go with a method name; a configured defense already has its own")
    check = verify(model, clean) if verify is not None else None
    t0 = time.perf_counter()
    with (meter() if meter is not None else contextlib.nullcontext()):
        purified = defense.purify(model, clean, progress=progress, callback=callback)
    wall = time.perf_counter() - t0
    report: dict[str, Any] = {"clean_size": len(defenses.as_dataset(clean)), **defense.report}
    if check is not None:
        report["detector"] = check(purified)
    if test is not None:
        if before is None:
            before = evaluate_saved(model, metadata, bundle=test)
        after = evaluate_saved(purified, metadata, bundle=test)
        report["before"], report["after"] = before, after
        report["der"] = defense_effectiveness_rate(before, after) if before.get("asr") is not None else None
    return Purification(purified, defense, report, wall)
