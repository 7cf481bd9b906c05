"""The one interface every backdoor detector implements, and the steps they share.

A detector recovers, for every class ``c``, the smallest trigger that sends clean images of
the other classes to ``c`` (:meth:`Detector.reverse`, one family per module). A backdoor's
target needs a much smaller one than the other classes, which the median-absolute-deviation
test of :mod:`.outlier` finds. The shared driver (:meth:`Detector.detect`):

1. checks the clean set against the model and splits it per class into an optimisation part
   and a held-out part (:func:`.clean.load_clean`); clean data only, no test data, no attack;
2. reverses a trigger per class present in the clean set, using only images of the other
   classes, and measures its flip rate on the held-out images of the other classes;
3. flags the class with the largest small-side anomaly index of the trigger sizes if it
   exceeds the threshold (``threshold``, raised for more than ``threshold_classes`` classes by
   :func:`.outlier.class_count_threshold`); its held-out flip rate is the proxy ASR.
"""
from __future__ import annotations

import time
import warnings
from abc import abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..defenses.base import Configured, Options
from ..errors import ConfigError
from .clean import CleanSplit, check_images, load_clean
from .outlier import DEFAULT_THRESHOLD, REFERENCE_CLASSES, anomaly_indices, class_count_threshold
from .report import DetectionReport, Trigger

Log = Callable[[str], None]


@dataclass
class DetectorConfig(Options):
    """Settings shared by every detector.

    ``flip_rate``: share of a batch of other-class images a trigger must send to its class to
    count as found (early stop per class once it is reached and no longer shrinking).
    ``max_steps``: optimisation steps per class at most (the CPU budget), on batches of
    ``batch_size`` images. ``holdout``: share of each class kept out of the optimisation to
    measure the triggers (proxy ASR), capped at ``max_holdout`` images. ``min_per_class``:
    clean images needed in each class that has any. ``threshold``: anomaly index above which
    the model is flagged (Neural Cleanse: 2), meant for ``threshold_classes`` classes: with more
    classes analysed it is raised so that a clean model crosses it as rarely as with that many
    (:func:`.outlier.class_count_threshold`; 2.55 for GTSRB's 43); ``None`` uses it as is.
    """
    flip_rate: float = 0.9
    max_steps: int = 100
    batch_size: int = 32
    holdout: float = 0.2
    max_holdout: int = 500
    min_per_class: int = 5
    threshold: float = DEFAULT_THRESHOLD
    threshold_classes: int | None = REFERENCE_CLASSES
    seed: int = 0

    def validate(self) -> "DetectorConfig":
        if not 0 < self.flip_rate <= 1:
            raise ConfigError(f"flip_rate must lie in (0, 1], got {self.flip_rate}")
        for key in ("max_steps", "batch_size", "max_holdout"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {v!r}")
        if isinstance(self.min_per_class, bool) or not isinstance(self.min_per_class, int) or self.min_per_class < 2:
            raise ConfigError(f"min_per_class must be an integer >= 2 (one image to optimise, one to measure), "
                              f"got {self.min_per_class!r}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must lie in (0, 1), got {self.holdout}")
        if not self.threshold > 0:
            raise ConfigError(f"threshold must be positive, got {self.threshold}")
        if self.threshold_classes is not None and (isinstance(self.threshold_classes, bool) or not isinstance(
                self.threshold_classes, int) or self.threshold_classes < 2):
            raise ConfigError(f"threshold_classes must be an integer >= 2 or None, got {self.threshold_classes!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClassResult:
    """What :meth:`Detector.reverse` found for one class."""
    size: float          # the trigger size compared across classes (smaller = easier)
    trigger: Trigger
    flip_rate: float     # on the optimisation batch where ``size`` was recorded
    reached: bool        # whether ``flip_rate`` reached the config's
    steps: int


class Detector(Configured):
    """Base class: configure in the constructor, act in :meth:`detect`."""

    name: ClassVar[str] = "detector"
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig
    #: what :attr:`ClassResult.size` measures, for tables
    size_name: ClassVar[str] = "size"
    #: the options that buy a class more optimisation when none reaches the flip rate
    budget_options: ClassVar[str] = "max_steps"
    config: DetectorConfig

    def check_items(self, x0: Any) -> None:
        """DataError (one line) unless ``x0`` is an item this family reverses a trigger on (default:
        a C x H x W image or a T x C x H x W clip)."""
        check_images(x0)

    @abstractmethod
    def reverse(self, model: nn.Module, images: torch.Tensor, target: int,
                generator: torch.Generator) -> ClassResult:
        """The smallest trigger sending ``images`` (other classes, CPU, [0, 1]) to ``target``."""

    def detect(self, model: nn.Module, clean_data: Dataset | DataLoader, *, log: Log | None = None) -> DetectionReport:
        """Analyse ``model`` on ``clean_data`` (clean images only); the model is left unchanged."""
        cfg = self.config
        t0 = time.perf_counter()
        data = load_clean(model, clean_data, cfg.holdout, cfg.max_holdout, cfg.min_per_class, cfg.seed,
                          self.check_items)
        notes = []
        if data.missing:
            notes.append("the clean set has no images of class(es) " + ", ".join(data.label(c) for c in data.missing)
                         + ": they are not analysed")
            warnings.warn(notes[-1], stacklevel=2)
        device = _device(model)
        g = torch.Generator().manual_seed(int(cfg.seed))
        results: dict[int, ClassResult] = {}
        rows: list[dict[str, Any]] = []
        with _frozen(model):
            for c in range(data.num_classes):
                if c in data.missing:
                    rows.append({"class": c, "label": data.label(c), "status": "no clean images", "n_clean": 0})
                    continue
                tc = time.perf_counter()
                res = self.reverse(model, data.x_opt[data.y_opt != c], c, g)
                hold = flip_rate(model, res.trigger, data.x_hold[data.y_hold != c], c, device)
                results[c] = res
                rows.append({"class": c, "label": data.label(c), "status": "ok", "n_clean": data.counts[c],
                             "size": res.size, "reached": res.reached, "flip_rate": res.flip_rate,
                             "flip_rate_holdout": hold, "steps": res.steps,
                             "seconds": time.perf_counter() - tc})
                if log:
                    log(f"class {data.label(c)}: {self.size_name} {res.size:.4g}"
                        + ("" if res.reached else " (flip rate not reached)")
                        + f", held-out flip rate {100 * hold:.1f} %, {res.steps} steps")
            classes = sorted(results)
            index = anomaly_indices([results[c].size for c in classes])
            for r in rows:
                if r["status"] == "ok":
                    r["anomaly_index"] = float(index[classes.index(r["class"])])
            # a class whose trigger was not found has only a bound on its size: it cannot be the verdict's target
            found = [i for i, c in enumerate(classes) if results[c].reached]
            if not found:
                notes.append(f"no class reached the flip rate {cfg.flip_rate:g} within its optimisation budget: "
                             f"the verdict is not meaningful; raise {self.budget_options}")
                warnings.warn(notes[-1], stacklevel=2)
            best = max(found or range(len(classes)), key=lambda i: index[i])
            candidate, score = classes[best], float(index[best])
            row = next(r for r in rows if r["class"] == candidate)
            proxy = row["flip_rate_holdout"]
            refined = self.refine(model, data.x_opt[data.y_opt != candidate], candidate, results[candidate], g)
            if refined is not None:  # a truer trigger for the suspected class; the verdict keeps the sizes above
                proxy = flip_rate(model, refined.trigger, data.x_hold[data.y_hold != candidate], candidate, device)
                results[candidate] = refined
                row["refined"] = {"size": refined.size, "flip_rate": refined.flip_rate, "flip_rate_holdout": proxy,
                                  "steps": refined.steps}
                if log:
                    log(f"class {data.label(candidate)} refined: {self.size_name} {refined.size:.4g}, "
                        f"held-out flip rate {100 * proxy:.1f} %, {refined.steps} steps")
        threshold = cfg.threshold if cfg.threshold_classes is None else \
            class_count_threshold(cfg.threshold, len(classes), cfg.threshold_classes)
        flagged = score > threshold and results[candidate].reached
        return DetectionReport(
            method=self.name, backdoored=flagged, target=candidate if flagged else None, candidate=candidate,
            score=score, threshold=threshold, proxy_asr=proxy, size_name=self.size_name, per_class=rows,
            triggers={c: r.trigger for c, r in results.items()}, class_names=list(data.class_names),
            n_clean=len(data.y_opt) + len(data.y_hold), n_optimise=len(data.y_opt), n_holdout=len(data.y_hold),
            missing_classes=list(data.missing), config=cfg.to_dict(), seconds=time.perf_counter() - t0,
            warnings=notes)

    def refine(self, model: nn.Module, images: torch.Tensor, target: int, found: ClassResult,
               generator: torch.Generator) -> ClassResult | None:
        """Optionally improve the suspected class's trigger after the verdict (default: no)."""
        return None

    def split(self, model: nn.Module, clean_data: Dataset | DataLoader) -> CleanSplit:
        """The checked clean split this detector works on (the same for the same data and seed)."""
        cfg = self.config
        return load_clean(model, clean_data, cfg.holdout, cfg.max_holdout, cfg.min_per_class, cfg.seed,
                          self.check_items)


def flip_rate(model: nn.Module, trigger: Trigger, images: torch.Tensor, target: int,
              device: torch.device | None = None, batch_size: int = 256) -> float:
    """Share of ``images`` that ``model`` classifies as ``target`` once ``trigger`` is applied."""
    if len(images) == 0:
        return float("nan")
    device = device or _device(model)
    hits = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            xb = trigger.apply(images[i:i + batch_size].to(device))
            hits += int((model(xb).argmax(1) == target).sum())
    return hits / len(images)


def replayed_flip_rate(model: nn.Module, trigger: Trigger, images: torch.Tensor, labels: torch.Tensor,
                       target: int) -> tuple[float, int]:
    """A recovered trigger replayed on ``model``: the share of the ``images`` of the classes other
    than ``target`` that it sends to ``target`` (in eval mode, no gradients; the model's mode is
    restored), and how many images that share is of. The trigger-free ASR estimate of a
    purified model: the trigger recovered before purification stands in for the unknown real one."""
    others = images[labels != target]
    with _frozen(model):
        return flip_rate(model, trigger, others, target), int(len(others))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _frozen:
    """Eval mode and no parameter gradients for the duration (both restored after)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc):
        for p, f in zip(self.model.parameters(), self.flags):
            p.requires_grad_(f)
        self.model.train(self.training)
        return False
