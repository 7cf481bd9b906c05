"""Detect, then unlearn what was found, with the clean Fisher guarding clean knowledge.

A candidate for fipurify's default purifier (issue 19; protocol in
``docs/default-purifier-protocol.md``, record in ``docs/default-purifier-devlog.md``). It adds
to FIP what FIP lacks, a signal that points at the backdoor, and keeps FIP's insight that the
clean Fisher tells which weights hold clean knowledge:

1. **Detect** from clean data only: :func:`fipurify.detection.detect` reverse-engineers a
   trigger per class (Neural Cleanse by default) and flags the classes whose trigger is
   anomalously small (median-absolute-deviation index above the detector's threshold: 2 for up to
   ten classes, raised for more, 2.55 for 43; :func:`fipurify.detection.class_count_threshold`).
2. **Unlearn**: fine-tune all weights on the clean training split; in each batch a share
   ``stamp`` of the (augmented) images carries a recovered trigger of a flagged class, one
   drawn at random per image, *under its true label*:

   .. math::

      \\min_\\theta \\; \\frac{1}{B} \\sum_i \\mathrm{CE}(f_\\theta(s_i \\odot T(x_i) + (1 - s_i) x_i), y_i)
      + \\frac{\\eta_r}{2} \\sum_j \\bar F_j (\\theta_j - \\theta^0_j)^2

   with :math:`s_i \\sim \\mathrm{Bernoulli}(\\texttt{stamp})`, :math:`T` the recovered trigger
   and :math:`\\bar F` the diagonal clean Fisher at the backdoored weights :math:`\\theta^0`
   (mean-normalised, so ``eta_r`` is a scale-free weight; ``eta_r = 0`` is plain trigger
   unlearning as in Neural Cleanse's mitigation). The anchor acts as FIP's does, through an
   exact proximal step after each SGD step (:func:`~fipurify.curvature.fisher.proximal_anchor_step`):
   a gradient step on it diverges for the largest Fisher entries.
3. **Verify and repeat**: the detector runs again on the unlearned model; while it still flags
   a class and fewer than ``rounds`` rounds ran, the next round unlearns the triggers it finds
   (added to those of earlier rounds); the loop ends as soon as nothing is flagged. With
   ``verify`` the last round is followed by one more detection, so the report always ends
   with the detector's verdict on the returned model (``report["rounds"][-1]``).

When nothing is flagged in the first round the model is returned unchanged and the report
says so: a clean model keeps its accuracy exactly, and a backdoor the detector misses is not
removed (the detector's limits are this method's limits: it misses SIG, see
``docs/default-purifier-devlog.md``). Registered as ``detect-unlearn`` (eta_r 0.3), this is fipurify's
default purifier for image classification.

**Shared adversarial unlearning** (``shared_weight > 0``, variant ``fisher-unlearn``) removes
that dependence on the detector. Each batch also gets SAU's term (Wei et al., NeurIPS 2023;
:mod:`fipurify.defenses.sau`): per-sample L-inf PGD finds perturbations that fool both the
model and a frozen copy of the backdoored model towards the same label, and the update adds

.. math::

   \\lambda_s \\frac{1}{B} \\sum_{i:\\, h_0(\\tilde x_i) \\notin \\{y_i, h_0(x_i)\\}} -\\log\\big(1 - p_\\theta(h_0(\\tilde x_i) \\mid \\tilde x_i)\\big),

which pushes the model off the reference's adversarial label: a backdoor is a shortcut both
models share, found whether or not a mask-shaped trigger explains it. With this term the
first round always unlearns (a missed detection no longer means "unchanged"); the recovered
triggers of flagged classes are still stamped, and the clean-Fisher anchor still guards
clean knowledge. The adversarial term is evaluated with BatchNorm in eval mode (its
perturbed images never enter the running statistics), as in SAU.
Needs images (the triggers are pixel masks), so it applies to image classification only.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..curvature.fisher import diag_fisher, fisher_anchor_loss, proximal_anchor_step, snapshot
from ..errors import ConfigError, DataError
from .base import DEFENSES, Defense, DefenseConfig, EpochCallback, Step, labelled
from .loop import finetune
from .sau import check_pgd_options, shared_adversarial_examples, shared_adversarial_risk


@dataclass
class TriggerUnlearnConfig(DefenseConfig):
    """Options of :class:`TriggerUnlearn` (on top of the fine-tuning schedule).

    ``stamp``: share of each batch stamped with a recovered trigger (true labels kept).
    ``eta_r``: weight of the clean-Fisher anchor (0 = off). ``rounds``: detect-unlearn rounds
    at most; ``verify``: run the detector once more after the last unlearning round (its
    verdict is the report's last ``rounds`` entry). ``detector``: a :mod:`fipurify.detection` method, or
    "auto" for the task's (``point-cluster-size`` on point clouds, ``neural-cleanse`` on images and clips); ``detector_options`` its
    options (e.g. ``{"max_steps": 50}``). ``shared_weight``: weight of SAU's shared-adversarial
    unlearning term (0 = off; > 0 also makes the first round unlearn when nothing is flagged);
    ``adv_eps``, ``adv_steps``, ``adv_step_size``, ``adv_init``: its PGD (SAU's defaults).
    """
    epochs: int = 20
    lr: float = 0.01
    milestones: tuple[int, ...] = (15,)
    stamp: float = 0.2
    eta_r: float = 0.0
    rounds: int = 2
    verify: bool = True
    detector: str = "auto"
    detector_options: dict[str, Any] | None = None
    auto_augment: bool = True
    augment_tolerance: float = 0.05
    shared_weight: float = 0.0
    adv_eps: float = 0.2
    adv_steps: int = 5
    adv_step_size: float = 0.2
    adv_init: str = "max"

    def validate(self) -> "TriggerUnlearnConfig":
        super().validate()
        if not 0 < self.stamp <= 1:
            raise ConfigError(f"stamp must lie in (0, 1], got {self.stamp}")
        if not self.eta_r >= 0:
            raise ConfigError(f"eta_r must be >= 0, got {self.eta_r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if not self.shared_weight >= 0:
            raise ConfigError(f"shared_weight must be >= 0, got {self.shared_weight}")
        check_pgd_options(self, "adv_eps", "adv_step_size", "adv_steps", "adv_init")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["detector_options"] = dict(self.detector_options or {})
        return d


class TriggerUnlearn(Defense):
    """Clean-data trigger recovery, then unlearning under the clean-Fisher anchor (see module doc)."""

    name = "trigger-unlearn"
    summary = {"trigger-unlearn": "trigger recovery from clean data (Neural Cleanse; on point clouds a cluster of "
                                  "points), then unlearning it",
               "trigger-unlearn-fisher": "as `trigger-unlearn`, with the clean-Fisher anchor (eta_r = 1)",
               "detect-unlearn": "`trigger-unlearn-fisher` at eta_r = 0.3, the setting the clean-data rule picked "
                                 "(a backdoor the detector misses is left); the first step of the default",
               "fisher-unlearn": "as `detect-unlearn`, always adding SAU's shared "
                                 "adversarial unlearning, so a backdoor the detector misses is unlearned too "
                                 "(that term perturbs pixels: images only)"}
    config_class = TriggerUnlearnConfig
    config: TriggerUnlearnConfig
    tasks = ("image-classification", "video-classification", "pointcloud-classification")
    task_reason = ("it recovers and stamps a trigger with a detector: a mask and pattern on images and on every frame "
                   "of a clip, a cluster of points on a point cloud")

    def detector_name(self) -> str:
        """The detector used: the configured one, or for "auto" the task's."""
        if self.config.detector != "auto":
            return self.config.detector
        return "point-cluster-size" if self.task.name == "pointcloud-classification" else "neural-cleanse"

    def _detect(self, model: nn.Module, train_set: Dataset):
        """The detector's report, or (with the shared-adversarial term, which works without it) the
        one-line reason the detector cannot run on this clean set (e.g. fewer than 3 classes)."""
        from ..detection import detect  # detection builds on defenses.base: imported when used
        opts = {"seed": self.config.seed, **(self.config.detector_options or {})}
        try:
            return detect(model, train_set, method=self.detector_name(), **opts)
        except DataError as e:
            if self.config.shared_weight > 0:
                return str(e)
            raise DataError(f"{self.method_name()} finds the backdoor with a detector, which cannot run here: {e}; "
                            "method 'fisher-unlearn' also unlearns without it") from None

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg = self.config
        if cfg.shared_weight > 0 and self.task.name != "image-classification":
            raise ConfigError(f"{self.method_name()}'s shared adversarial unlearning (shared_weight > 0) perturbs "
                              f"images in [0, 1]; on a {self.task.name} model use shared_weight=0 (detect-unlearn)")
        seconds = {"detect": 0.0, "setup": 0.0}
        history: list[dict[str, Any]] = []
        rounds: list[dict[str, Any]] = []
        triggers: dict[int, Any] = {}
        params = [p for p in model.parameters() if p.requires_grad]
        anchor = fdiag = None
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        augmentation = {"augment": cfg.augment, "flip": cfg.flip}
        if cfg.auto_augment:
            augmentation = augmentations_kept(model, train_set, cfg.augment_tolerance, cfg.seed, self.task)
        schedule = cfg.updated(**{k: augmentation[k] for k in ("augment", "flip")})
        reference = None
        if cfg.shared_weight > 0:  # the frozen backdoored model whose adversarial labels are unlearned
            reference = copy.deepcopy(model).eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        shared_counts: list[int] = [0, 0, 0]  # examples, reference fooled, shared
        for r in range(1, cfg.rounds + 2):
            t0 = time.perf_counter()
            report = self._detect(model, train_set)
            seconds["detect"] += time.perf_counter() - t0
            if isinstance(report, str):  # the detector cannot run here: shared-adversarial unlearning only
                flagged: list[int] = []
                rounds.append({"round": r, "backdoored": None, "flagged": flagged, "detector_skipped": report})
            else:
                flagged = self._flagged(report)
                rounds.append({"round": r, "backdoored": report.backdoored, "target": report.target,
                               "score": report.score, "proxy_asr": report.proxy_asr, "flagged": flagged,
                               "seconds": report.seconds})
            if r > cfg.rounds or (not flagged and (reference is None or r > 1)):
                break  # this detection was the verification, or nothing (left) to unlearn
            for c in flagged:
                triggers[c] = report.triggers[c]
            if cfg.eta_r > 0 and anchor is None:
                t0 = time.perf_counter()
                fdiag = diag_fisher(model, DataLoader(train_set, batch_size=64), params, normalize="mean")
                anchor = snapshot(params)
                seconds["setup"] += time.perf_counter() - t0
            stamps = list(triggers.values())

            def objective(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int,
                          stamps: list = stamps) -> dict[str, torch.Tensor]:
                if reference is not None:
                    sae = shared_adversarial_examples(m, reference, x, y, eps=cfg.adv_eps, steps=cfg.adv_steps,
                                                      step_size=cfg.adv_step_size, init=cfg.adv_init,
                                                      generator=gen)
                    shared_counts[0] += len(x)
                    shared_counts[1] += int(sae.ref_fooled.sum())
                    shared_counts[2] += int(sae.shared.sum())
                if stamps:
                    x = stamp_triggers(x, stamps, cfg.stamp, gen)
                terms = {"ce": self.task.loss(m, x, y)}
                if reference is not None:
                    was = m.training
                    m.eval()  # the perturbed images stay out of BatchNorm's statistics
                    logits_adv = m(sae.x_adv)
                    m.train(was)
                    terms["sar"] = cfg.shared_weight * shared_adversarial_risk(logits_adv, sae)
                if anchor is not None:  # logged; the anchor acts through the proximal step below
                    with torch.no_grad():
                        terms["anchor"] = 0.5 * cfg.eta_r * fisher_anchor_loss(params, anchor, fdiag)
                return terms

            def proximal(lr: float) -> None:
                proximal_anchor_step(params, anchor, fdiag, lr, cfg.eta_r)

            history += finetune(model, params, train_set, schedule, holdout=holdout, objective=objective,
                                post_step=proximal if anchor is not None else None,
                                task=self.task, progress=progress, callback=labelled(callback, "round", str(r)),
                                desc=f"unlearn (round {r})")
            if r == cfg.rounds and not cfg.verify:
                break
        extra: dict[str, Any] = {}
        if reference is not None:
            n = max(shared_counts[0], 1)
            extra = {"ref_fooled_share": shared_counts[1] / n, "shared_share": shared_counts[2] / n}
        return Step(model, history, sum(p.numel() for p in params) if history else 0, seconds,
                    {**extra, "rounds": rounds, "augmentation": augmentation, "unlearned_targets": sorted(triggers),
                     "replayed_proxy_asr": _replayed(model, triggers, holdout),
                     "triggers": {c: t.summary() for c, t in triggers.items()}})

    @staticmethod
    def _flagged(report) -> list[int]:
        """The classes whose anomaly index exceeds the detector's threshold (the verdict's
        target first); all-to-one attacks give one, several targets give several."""
        out = [report.target] if report.backdoored and report.target is not None else []
        for row in report.per_class:
            c, a = row.get("class"), row.get("anomaly_index")
            if c is not None and a is not None and a > report.threshold and c not in out:
                out.append(int(c))
        return out


def format_rounds(report: dict[str, Any]) -> str | None:
    """One line on what the detector saw in each round of a purification report (None if it has no
    rounds), e.g. ``detector rounds: 1 flagged class 0 (index 4.44) -> unlearned; 2 not flagged (1.38)``."""
    rounds = report.get("rounds")
    if not rounds:
        return None
    parts = []
    for r in rounds:
        if r.get("detector_skipped"):
            parts.append(f"{r['round']} detector skipped ({r['detector_skipped']})")
        elif r.get("flagged"):
            cls = ", ".join(str(c) for c in r["flagged"])
            parts.append(f"{r['round']} flagged class {cls} (index {float(r['score']):.2f}) -> unlearned")
        else:
            parts.append(f"{r['round']} not flagged ({float(r['score']):.2f})")
    out = "detector rounds: " + "; ".join(parts)
    replay = report.get("replayed_proxy_asr") or {}
    if replay:
        out += "; recovered trigger replayed on held-out images: " + ", ".join(
            f"class {c} {100 * v:.1f} %" for c, v in replay.items())
    return out


@torch.no_grad()
def augmentations_kept(model: nn.Module, data: Dataset, tolerance: float, seed: int = 0,
                       task: Any = None) -> dict[str, Any]:
    """Which training augmentations the model is already invariant to, judged on clean data.

    A model trained without augmentation, or on a task where a flip changes the label (traffic
    signs), loses accuracy on augmented clean images; fine-tuning it with that augmentation
    costs clean accuracy for nothing. The clean accuracy (eval mode) on the images as they
    are, after a random crop (zero padding 4) and after a horizontal flip is measured; each
    augmentation is kept if it costs at most ``tolerance`` of accuracy. Returns the decision
    (``augment`` = crop, ``flip``) and the three accuracies. For another ``task`` (clips, point
    clouds) the task's own augmentation (:meth:`.Task.augment`, no flip) is measured the same way:
    ``augment`` is kept or dropped, ``flip`` is False.
    """
    from ..augment import random_crop_flip
    gen = torch.Generator().manual_seed(seed)
    if task is None or task.name == "image-classification":
        variants = {"crop": lambda x: random_crop_flip(x, 4, False, generator=gen), "flip": lambda x: x.flip(3)}
        acc = _accuracies(model, data, variants)
        return {"augment": acc["crop"] >= acc["plain"] - tolerance, "flip": acc["flip"] >= acc["plain"] - tolerance,
                "accuracy": acc}
    acc = _accuracies(model, data, {"augmented": lambda x: task.augment(x, gen, flip=False)}, task.collate_fn)
    return {"augment": acc["augmented"] >= acc["plain"] - tolerance, "flip": False, "accuracy": acc}


@torch.no_grad()
def _accuracies(model: nn.Module, data: Dataset, variants: dict[str, Any], collate_fn: Any = None) -> dict[str, float]:
    """Clean accuracy (eval mode; the model's mode is restored) on ``data`` as it is ("plain") and under
    each named input transform of ``variants``, batch by batch in one pass."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    hits, n = {"plain": 0, **{k: 0 for k in variants}}, 0
    try:
        for x, y in DataLoader(data, batch_size=256, collate_fn=collate_fn):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            hits["plain"] += int((model(x).argmax(1) == y).sum())
            for k, transform in variants.items():
                hits[k] += int((model(transform(x)).argmax(1) == y).sum())
            n += len(y)
    finally:
        model.train(was)
    return {k: v / max(n, 1) for k, v in hits.items()}


def _replayed(model: nn.Module, triggers: dict[int, Any], holdout: Dataset | None) -> dict[int, float]:
    """For each unlearned class, the share of hold-out clean images of the *other* classes that the
    returned model sends to it under the trigger recovered before unlearning (a proxy ASR measured on
    images neither the detector nor the fine-tuning saw). The detector's own proxy ASR after purifying
    is not this figure: it re-optimises a trigger, and stops at its flip-rate target (90 %) for any class."""
    if holdout is None or not triggers:
        return {}
    from ..detection import replayed_flip_rate

    xs, ys = zip(*(holdout[i] for i in range(len(holdout))))
    x, y = torch.stack(list(xs)), torch.as_tensor([int(v) for v in ys])
    return {c: replayed_flip_rate(model, t, x, y, c)[0] for c, t in triggers.items()}


def stamp_triggers(x: torch.Tensor, triggers: list, share: float, gen: torch.Generator) -> torch.Tensor:
    """``x`` with a share ``share`` of its images stamped, each with a trigger drawn from ``triggers``."""
    n = len(x)
    chosen = torch.rand(n, generator=gen) < share
    which = torch.randint(len(triggers), (n,), generator=gen)
    if not bool(chosen.any()):
        return x
    out = x.clone()
    for k, t in enumerate(triggers):
        idx = torch.nonzero(chosen & (which == k)).flatten().to(x.device)
        if len(idx):
            out[idx] = t.apply(x[idx])
    return out


DEFENSES.register("trigger-unlearn", TriggerUnlearn)
DEFENSES.register("trigger-unlearn-fisher", TriggerUnlearn, eta_r=1.0)
DEFENSES.register("detect-unlearn", TriggerUnlearn, eta_r=0.3)
DEFENSES.register("fisher-unlearn", TriggerUnlearn, eta_r=0.3, shared_weight=1.0)
