"""The detector before and after purification: did the suspected backdoor go away?

``fipurify purify --verify`` runs a detector on the model before purification and on the
purified model, on the same clean images (clean data only). Two numbers tell whether the
backdoor went away:

* the *replayed* proxy ASR: the trigger recovered from the model before purification,
  applied to the purified model on the same held-out clean images (a trigger-free ASR
  estimate: the recovered trigger stands in for the unknown real one);
* the verdict of the detector re-run on the purified model (is any class still anomalously
  easy to reach?). Its own proxy ASR is not a drop measure: it re-optimises a trigger,
  which flips most images toward any class.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from .base import Detector, replayed_flip_rate
from .registry import create
from .report import DetectionReport, _finite


def replay(detector: Detector, model: nn.Module, before: DetectionReport,
           clean_data: Dataset | DataLoader) -> dict[str, Any] | None:
    """Apply ``before``'s recovered trigger (of its candidate class) to ``model`` on the held-out
    clean images of the other classes; None when ``before`` recovered nothing."""
    trig = before.trigger
    if trig is None:
        return None
    data = detector.split(model, clean_data)
    asr, n = replayed_flip_rate(model, trig, data.x_hold, data.y_hold, trig.target)
    return {"target": trig.target, "proxy_asr": asr, "n_images": n}


class PurificationCheck:
    """The detector on the model before purification (run at construction, so that bad clean
    data fails before any training), then on the purified model (:meth:`after`)."""

    def __init__(self, model: nn.Module, clean_data: Dataset | DataLoader, method: str = "neural-cleanse",
                 log=None, **options: Any):
        self.detector = create(method, **options)
        self.clean_data, self.log = clean_data, log
        self.before = self.detector.detect(model, clean_data, log=log)

    def after(self, purified: nn.Module) -> dict[str, Any]:
        """Detect on ``purified``, replay the old trigger on it, and :func:`compare`."""
        after = self.detector.detect(purified, self.clean_data, log=self.log)
        after.replay = replay(self.detector, purified, self.before, self.clean_data)
        return compare(self.before, after)


def verify_purification(model: nn.Module, purified: nn.Module, clean_data: Dataset | DataLoader,
                        method: str = "neural-cleanse", log=None, **options: Any) -> dict[str, Any]:
    """Run the detector on ``model`` and ``purified`` and compare (see :func:`compare`)."""
    return PurificationCheck(model, clean_data, method, log, **options).after(purified)


def compare(before: DetectionReport, after: DetectionReport) -> dict[str, Any]:
    """Both reports (as dicts) and the comparison: the suspected class (``before``'s target, else
    its most suspicious class), its proxy ASR before, the replayed proxy ASR after (the old
    trigger on the new model; ``after``'s own held-out flip rate for that class when no
    replay was run), and both verdicts."""
    cls = before.target if before.target is not None else before.candidate
    replayed = after.replay if after.replay and after.replay.get("target") == cls else None
    if replayed is not None:
        asr_after, how = replayed["proxy_asr"], "replayed"
    else:
        row = next((r for r in after.per_class if r["class"] == cls and r["status"] == "ok"), None)
        asr_after, how = (row["flip_rate_holdout"] if row else None), "re-optimised"
    return {"method": before.method, "suspected_class": cls, "flagged_before": before.backdoored,
            "flagged_after": after.backdoored, "target_after": after.target,
            "score_before": _finite(before.score), "score_after": _finite(after.score), "threshold": before.threshold,
            "proxy_asr_before": before.proxy_asr, "proxy_asr_after": asr_after, "proxy_asr_after_kind": how,
            "class_label": before.class_label(cls), "before": before.to_dict(), "after": after.to_dict()}


def format_comparison(c: dict[str, Any]) -> str:
    """One line, e.g. ``detector: suspected target 0, proxy ASR 98.2 % -> 3.1 %; after: not flagged (score 0.81 <= 2)``."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    def verdict(flagged, score):
        score = float(score)  # "inf" from JSON-ready form
        return f"{'flagged' if flagged else 'not flagged'} (score {score:.2f} {'>' if flagged else '<='} {c['threshold']:.2f})"

    what = "suspected target" if c["flagged_before"] else "no backdoor flagged; most suspicious class"
    return (f"detector ({c['method']}): {what} {c['class_label']}, proxy ASR {pct(c['proxy_asr_before'])} -> "
            f"{pct(c['proxy_asr_after'])}; before: {verdict(c['flagged_before'], c['score_before'])}, "
            f"after: {verdict(c['flagged_after'], c['score_after'])}"
            + (f", suspected target {c['target_after']}" if c["flagged_after"] else ""))
