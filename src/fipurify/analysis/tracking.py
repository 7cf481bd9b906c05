"""Record smoothness (lambda_max, Tr(H), Tr(F)) with ACC / ASR while a model trains or is purified.

>>> tracker = SmoothnessTracker(sample, every=5, clean_test=test, backdoor_test=bd_test)
>>> defenses.finetune(..., callback=tracker)            # or training.train_model(..., callback=tracker)
>>> tracker.records   # [{"epoch": 5, "lambda_max": ..., "trace_f": ..., "acc": ..., "asr": ...}, ...]

The tracker has ``needs_model = True``: loops that honour it call ``tracker(rec, model)``.
The backdoor test set, when given, is only *measured* (ASR): neither training nor
purification ever sees it.
"""
from __future__ import annotations

import time
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..metrics import evaluate
from .data import as_batches
from .measures import smoothness_report
from .params import ParamSpec

TRACKABLE = ("lambda_max", "trace", "fisher")


class SmoothnessTracker:
    """Per-epoch callback measuring curvature every ``every`` epochs (and at ``epoch == 0`` via
    :meth:`measure`).

    Args:
        data: the fixed sample the curvature is measured on (batch, DataLoader or Dataset).
        every: measure at epochs divisible by ``every``.
        measures: any of ``"lambda_max"``, ``"trace"`` (Tr(H)), ``"fisher"`` (Tr(F)).
        clean_test / backdoor_test: when given, ACC / ASR are recorded too.
        params: ``"all"`` or ``"spectral"`` (see :mod:`fipurify.analysis.params`).
        lanczos_steps, probes: cost of lambda_max and Tr(H) (Hessian-vector products).
        annotate: also write the numbers into the loop's own record (its history).
        seed: the same probes at every epoch, so changes reflect the model, not the noise.
    """

    needs_model = True

    def __init__(self, data: Any, every: int = 1, measures: tuple[str, ...] = ("lambda_max", "fisher"),
                 clean_test: Dataset | None = None, backdoor_test: Dataset | None = None,
                 params: ParamSpec = "all", lanczos_steps: int = 20, probes: int = 20,
                 annotate: bool = True, seed: int = 0, progress: bool = False) -> None:
        if every < 1:
            raise ConfigError(f"every must be at least 1, got {every}")
        bad = sorted(set(measures) - set(TRACKABLE))
        if bad or not measures:
            raise ConfigError(f"measures must be chosen from {', '.join(TRACKABLE)}; got {list(measures)}")
        if backdoor_test is not None and clean_test is None:
            raise ConfigError("ASR tracking needs clean_test too (ACC and ASR are measured together)")
        self.batches = as_batches(data)
        self.every, self.measures, self.params = every, tuple(measures), params
        self.clean_test, self.backdoor_test = clean_test, backdoor_test
        self.lanczos_steps, self.probes, self.annotate = lanczos_steps, probes, annotate
        self.seed, self.progress = seed, progress
        self.records: list[dict[str, Any]] = []

    def __call__(self, rec: dict[str, Any], model: nn.Module | None = None) -> None:
        if model is None:
            raise ConfigError("SmoothnessTracker needs the model: call it as callback(record, model) "
                              "(loops do so when callback.needs_model is true)")
        epoch = int(rec.get("epoch", len(self.records)))
        if epoch % self.every:
            return
        out = self.measure(model, epoch)
        if self.annotate:
            rec.update({k: v for k, v in out.items() if k not in ("epoch", "seconds")})

    def measure(self, model: nn.Module, epoch: int = 0) -> dict[str, Any]:
        """Measure ``model`` now, append the record and return it."""
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        batches = [(x.to(device), y.to(device)) for x, y in self.batches]
        rep = smoothness_report(model, batches, measures=self.measures, params=self.params,
                                lanczos_steps=self.lanczos_steps, probes=self.probes, seed=self.seed,
                                progress=self.progress)
        out: dict[str, Any] = {"epoch": epoch}
        if rep.eigen is not None:
            out["lambda_max"] = rep.eigen.lambda_max
        if rep.trace is not None:
            out["trace_h"], out["trace_h_se"] = rep.trace.value, rep.trace.stderr
        if rep.fisher is not None:
            out["trace_f"] = rep.fisher.value
        if self.clean_test is not None:
            modes = [(m, m.training) for m in model.modules()]
            try:
                res = evaluate(model, self.clean_test, self.backdoor_test)
            finally:  # evaluate restores only the top-level flag; keep e.g. BN-in-eval as the loop set it
                for m, was in modes:
                    m.training = was
            out["acc"] = res["acc"]
            if res["asr"] is not None:
                out["asr"] = res["asr"]
        out["seconds"] = time.perf_counter() - t0
        self.records.append(out)
        return out
