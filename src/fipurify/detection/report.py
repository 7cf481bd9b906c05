"""What a detector found: the verdict, the per-class evidence and the recovered triggers."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Trigger:
    """A recovered trigger in pixel space ([0, 1]).

    ``kind`` is ``"mask-pattern"`` (Neural Cleanse: ``x' = (1 - m) * x + m * p`` with a mask
    ``m`` of shape 1 x H x W and a pattern ``p`` of shape C x H x W) or ``"perturbation"``
    (a universal additive ``delta`` of shape C x H x W: ``x' = clip(x + delta, 0, 1)``) or
    ``"points"`` (point clouds: ``points``, K x 3, replace each cloud's K points nearest their mean).
    """
    kind: str
    target: int
    mask: torch.Tensor | None = None
    pattern: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    points: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on a batch (N x C x H x W) or one image (C x H x W); a mask and pattern
        stamp every frame of clips (N x T x C x H x W) alike."""
        if self.kind == "mask-pattern":
            m, p = self.mask.to(x.device), self.pattern.to(x.device)
            return (1 - m) * x + m * p
        if self.kind == "points":
            from ..attacks.point_base import batched_points, place_cluster

            xb, single = batched_points(x)
            pts = self.points.to(xb)
            centre = pts.mean(0)
            out = place_cluster(xb, centre, pts - centre)
            return out[0] if single else out
        return (x + self.delta.to(x.device)).clamp(0, 1)

    def image(self) -> torch.Tensor:
        """A picture of the trigger (C x H x W in [0, 1]): mask * pattern, or the perturbation
        scaled to fill [0, 1] around grey."""
        if self.kind == "mask-pattern":
            return (self.mask * self.pattern).clamp(0, 1)
        d = self.delta
        return (0.5 + 0.5 * d / d.abs().max().clamp_min(1e-12)).clamp(0, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in
                (("mask", self.mask), ("pattern", self.pattern), ("delta", self.delta), ("points", self.points))
                if v is not None}

    def summary(self) -> dict[str, Any]:
        """Sizes of the trigger for JSON (the tensors themselves go to :meth:`DetectionReport.save_triggers`)."""
        out: dict[str, Any] = {"kind": self.kind, "target": self.target}
        if self.mask is not None:
            m = self.mask.detach().float()
            out.update(shape=list(self.pattern.shape), mask_l1=float(m.sum()),
                       mask_share=float(m.sum() / m.numel()), mask_pixels_over_half=int((m > 0.5).sum()))
            ys, xs = torch.nonzero(m[0] > 0.5, as_tuple=True)
            if len(ys):
                out["mask_box"] = [int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())]
        if self.points is not None:
            p = self.points.detach().float()
            c = p.mean(0)
            out.update(n_points=int(len(p)), centre=[float(v) for v in c],
                       radius=float((p - c).norm(dim=1).max()))
        if self.delta is not None:
            d = self.delta.detach().float()
            out.update(shape=list(d.shape), l2=float(d.norm()), linf=float(d.abs().max()),
                       rms=float(d.pow(2).mean().sqrt()))
        return out


@dataclass
class DetectionReport:
    """The result of :func:`fipurify.detect`.

    ``score`` is the largest small-side anomaly index over the classes whose trigger was found
    (larger = more suspicious), compared with ``threshold``; ``candidate`` is the class that has
    it, ``target`` the same class when ``backdoored`` (else None). ``proxy_asr`` is the share of held-out
    clean images of the other classes that the candidate's recovered trigger sends to it.
    ``per_class`` holds one row per class (``status`` "no clean images" for missing ones).
    """
    method: str
    backdoored: bool
    target: int | None
    candidate: int | None
    score: float
    threshold: float
    proxy_asr: float | None
    size_name: str
    per_class: list[dict[str, Any]]
    triggers: dict[int, Trigger]
    class_names: list[str]
    n_clean: int
    n_optimise: int
    n_holdout: int
    missing_classes: list[int]
    config: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    replay: dict[str, Any] | None = None

    @property
    def trigger(self) -> Trigger | None:
        """The recovered trigger of the suspected target (of the candidate when nothing is flagged)."""
        return self.triggers.get(self.candidate) if self.candidate is not None else None

    def class_label(self, c: int | None) -> str:
        if c is None:
            return "none"
        name = self.class_names[c] if c < len(self.class_names) else str(c)
        return str(c) if name == str(c) else f"{c} ({name})"

    def verdict(self) -> str:
        """One line: ``backdoored: yes, suspected target 0 (airplane), score 5.30 > threshold 2.00, proxy ASR 98.4 %``."""
        asr = "n/a" if self.proxy_asr is None else f"{100 * self.proxy_asr:.1f} %"
        if self.backdoored:
            return (f"backdoored: yes, suspected target {self.class_label(self.target)}, score {_num(self.score)} "
                    f"> threshold {self.threshold:.2f}, proxy ASR {asr}")
        return (f"backdoored: no, most suspicious class {self.class_label(self.candidate)}, score "
                f"{_num(self.score)} <= threshold {self.threshold:.2f}, proxy ASR {asr}")

    def table(self) -> str:
        """The per-class evidence as a text table."""
        head = ["class", self.size_name, "anomaly", "flip(opt)", "flip(held-out)", "steps", "seconds"]
        rows = []
        for r in self.per_class:
            label = self.class_label(r["class"]) + (" *" if r["class"] == self.target else "")
            if r["status"] != "ok":
                rows.append([label, r["status"], "", "", "", "", ""])
                continue
            rows.append([label, f"{r['size']:.4g}" + ("" if r["reached"] else " (not reached)"),
                         _num(r["anomaly_index"]), f"{100 * r['flip_rate']:.1f} %",
                         f"{100 * r['flip_rate_holdout']:.1f} %", str(r["steps"]), f"{r['seconds']:.1f}"])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for r in self.per_class:
            if r.get("refined"):
                f = r["refined"]
                lines.append(f"refined trigger of class {self.class_label(r['class'])}: {self.size_name} "
                             f"{f['size']:.4g}, held-out flip rate {100 * f['flip_rate_holdout']:.1f} % "
                             f"({f['steps']} steps): the proxy ASR")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (no tensors: the trigger is summarised; see :meth:`save_triggers`)."""
        trig = self.trigger
        return {"method": self.method, "backdoored": self.backdoored, "target": self.target,
                "candidate": self.candidate, "score": _finite(self.score), "threshold": self.threshold,
                "proxy_asr": self.proxy_asr, "size": self.size_name,
                "per_class": [{k: _finite(v) for k, v in r.items()} for r in self.per_class],
                "trigger": trig.summary() if trig is not None else None,
                "n_clean": self.n_clean, "n_optimise": self.n_optimise, "n_holdout": self.n_holdout,
                "missing_classes": self.missing_classes, "warnings": list(self.warnings),
                "replay": self.replay, "config": self.config, "seconds": self.seconds}

    def save_triggers(self, path: str | os.PathLike) -> None:
        """Write every class's recovered trigger tensors to a safetensors file
        (keys ``class<c>.mask``/``.pattern`` or ``class<c>.delta``)."""
        from safetensors.torch import save

        from ..io import atomic_write_bytes

        tensors = {f"class{c}.{k}": v for c, t in self.triggers.items() for k, v in t.tensors().items()}
        meta = {"method": self.method, "candidate": str(self.candidate), "target": str(self.target)}
        atomic_write_bytes(path, save(tensors, metadata=meta))


def _finite(v: Any) -> Any:
    """JSON has no infinity: +-inf becomes a large signed number's string form."""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _num(v: float) -> str:
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.2f}"
