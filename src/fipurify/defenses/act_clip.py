"""Activation clipping: per-channel bounds on the early activations, learned from clean data.

A trigger works by driving a few channels far beyond what clean images make of them. Clipping
puts an upper bound ``b_c`` on every channel of the first part of the network and sets each bound
as low as the clean data allow, so that what clean images do not need is cut. No weight changes:
the returned model carries the bounds as buffers (:class:`~fipurify.models.bounded.BoundedActivation`),
saves and loads like any other, and :func:`~fipurify.models.bounded.remove_bounds` takes them off.

The mitigation released with MM-BD (Wang et al., "MM-BD: Post-Training Detection of Backdoor
Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024)
learns the bounds by minimising the clipped model's distance to the unclipped one plus a penalty
on the bounds' size. Its raw form is not scale-free and collapses the bounds of a narrow model
(``docs/default-purifier-devlog.md``, candidate 4a); this is its scale-free form (candidate 4f).
With :math:`b^0_l` the per-channel maxima of module :math:`l`'s outputs over the clean images
and :math:`r_l \\in [0, 1]^{C_l}` the bounds relative to them (:math:`b_l = r_l \\odot b^0_l`,
starting at :math:`r_l = 1`):

.. math::

   \\min_r \\; \\frac{\\lVert f_{r}(x) - f(x) \\rVert^2}{\\mathrm{Var}(f(x))}
   + c \\, \\frac{1}{L} \\sum_l \\frac{\\lVert r_l \\rVert_2}{\\sqrt{C_l}}

(mean squared error over the batch's logits), Adam on :math:`r` (``lr``), ``epochs`` shuffled passes of
``batch_size`` over the clean training split, :math:`r` clamped to :math:`[0, 1]` after each step.
After every epoch the clipped model's predictions are compared with the unclipped model's on those
images: if they agree on at least ``agreement`` of them, these bounds are kept as the best so far and
:math:`c` is multiplied by ``penalty_factor`` (clip harder), else divided by it. The bounds returned
are the last that met the agreement (none met it: the clean maxima, which cut nothing clean).
With ``agreement_on="clean+mixed"`` the agreement must hold on a second set as well: every clean
image mixed with one of another class, :math:`\\lambda x_i + (1 - \\lambda) x_j` with
:math:`\\lambda \\sim U(0, 1)` (fixed by ``seed``), against the unclipped model's own predictions on
them. Images a model has learned by heart (GTSRB's clean reserve holds frames of the training
tracks) sit far from every decision boundary, so clipping can move the boundaries a long way before
it changes a prediction there; the mixtures lie between the classes, where a moved boundary shows
(``docs/default-purifier-devlog.md``, candidate 4i).
The modules bounded are the first ``layers`` share of the model's activation modules in forward
order (:func:`~fipurify.models.bounded.activations_in_order`; for PreActResNet18 at 0.5, every
ReLU of its first two stages), as the authors' code clips the first stages of a ResNet. Only
activations that are ``(N, C, H, W)`` feature maps count (a video model's per-frame CNN makes
``(N T, C, H, W)`` maps: one bound per channel serves every frame; on a point-cloud model the
``(N, C, P)`` per-point features count instead, one bound per channel serving every point), and a
module that several layers call
(one ``nn.ReLU`` reused, as in torchvision's ResNet blocks) is left out: one bound per channel
cannot serve two layers.

Settings: 50 epochs, batch 200, Adam lr 0.1, ``c`` from 0.5 by a factor 1.2 are the authors';
98 % agreement is fipurify's (the default purifier's budget is 2 points of clean accuracy).
Measured alone it removes only some backdoors (devlog, candidate 4f); ``detect-unlearn-clip``
(:mod:`fipurify.defenses.sequence`) runs it after ``detect-unlearn``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models.bounded import ACTIVATIONS, activations_in_order, insert_bounds
from .base import DEFENSES, Defense, DefenseConfig, EpochCallback, Step


#: the image sets the clipped model's agreement is measured on (module doc)
AGREEMENT_SETS = ("clean", "clean+mixed")


@dataclass
class ActivationClipConfig(DefenseConfig):
    """Options of :class:`ActivationClip` (see the module doc).

    ``layers``: share of the activation modules bounded, in forward order (at least one).
    ``agreement``: share of the clean training images on which the clipped model must predict as
    the unclipped one; ``agreement_on``: ``"clean"`` (those images) or ``"clean+mixed"`` (those and
    their between-class mixtures, each at ``agreement``). ``penalty``: the starting weight ``c`` of the bounds' size;
    ``penalty_factor``: its step after each epoch. ``epochs``, ``lr`` (Adam) and ``batch_size`` drive
    the optimisation of the bounds; the fine-tuning options of :class:`DefenseConfig` are unused
    (no weight changes).
    """
    epochs: int = 50
    lr: float = 0.1
    batch_size: int = 200
    layers: float = 0.5
    agreement: float = 0.98
    agreement_on: str = "clean"
    penalty: float = 0.5
    penalty_factor: float = 1.2

    def validate(self) -> "ActivationClipConfig":
        super().validate()
        if not 0 < self.layers <= 1:
            raise ConfigError(f"layers must lie in (0, 1], got {self.layers}")
        if not 0 < self.agreement <= 1:
            raise ConfigError(f"agreement must lie in (0, 1], got {self.agreement}")
        if self.agreement_on not in AGREEMENT_SETS:
            raise ConfigError(f"agreement_on must be one of {', '.join(AGREEMENT_SETS)}, got {self.agreement_on!r}")
        if not self.penalty > 0:
            raise ConfigError(f"penalty must be positive, got {self.penalty}")
        if not self.penalty_factor >= 1:
            raise ConfigError(f"penalty_factor must be >= 1, got {self.penalty_factor}")
        return self


def _inputs(data: Dataset, device: torch.device) -> torch.Tensor:
    return torch.cat([x for x, _ in DataLoader(data, batch_size=256)]).to(device)


def mixed_images(x: torch.Tensor, classes: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image of ``x`` mixed with one of another class: ``lam * x_i + (1 - lam) * x_j``,
    ``lam ~ U(0, 1)`` and the partner ``j`` drawn among the images whose ``classes`` differ
    (an image whose class is the only one present is mixed with a random other image)."""
    gen = torch.Generator().manual_seed(int(seed))
    n = len(x)
    partner = torch.empty(n, dtype=torch.long)
    cls = classes.cpu()
    for i in range(n):
        others = torch.nonzero(cls != cls[i]).flatten()
        pool = others if len(others) else torch.arange(n)
        partner[i] = pool[torch.randint(len(pool), (1,), generator=gen)]
    lam = torch.rand(n, generator=gen).view(-1, *([1] * (x.dim() - 1))).to(x)
    return lam * x + (1 - lam) * x[partner.to(x.device)]


def _agreement(model: nn.Module, sets: list[tuple[torch.Tensor, torch.Tensor]],
               buffers: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Per ``(images, reference predictions)`` set, the share the model predicts alike."""
    return [float((_logits(model, x, buffers).argmax(1) == ref).float().mean()) for x, ref in sets]


def _logits(model: nn.Module, x: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The model's outputs on ``x`` in batches of 200, with ``buffers`` in place of its own."""
    parts = [functional_call(model, buffers or {}, (x[i:i + 200],)) for i in range(0, len(x), 200)]
    return torch.cat(parts)


class ActivationClip(Defense):
    """Per-channel activation bounds learned from clean data, no weight changes (see module doc)."""

    name = "act-clip"
    summary = {"act-clip": "activation clipping (MM-BD's mitigation, scale-free): per-channel bounds on the early "
                           "activations, as low as 98 % agreement on the clean images allows; no weight changes",
               "act-clip-all": "`act-clip` on every activation (`layers` 1.0): the default's clipping step, "
                               "and the default on video"}
    config_class = ActivationClipConfig
    config: ActivationClipConfig
    tasks = ("image-classification", "video-classification", "pointcloud-classification")
    task_reason = ("its bounds are per channel of convolutional feature maps: (N, C, H, W) on images and on the "
                   "frames of a video model's CNN, (N, C, P) per-point features of a point-cloud model")

    def check_model(self, model: nn.Module) -> None:
        if not any(isinstance(m, ACTIVATIONS) for m in model.modules()):
            raise ConfigError(f"{self.method_name()} bounds activation modules, and this "
                              f"{type(model).__name__} has none (it may call torch.nn.functional.relu instead "
                              "of an nn.ReLU module)")

    def _map_ndim(self) -> int:
        """The rank of the feature maps bounded, as the task gives it (:attr:`.Task.feature_map_ndim`):
        4 for ``(N, C, H, W)``, 3 for a point-cloud model's per-point ``(N, C, P)``. A task whose
        activations are not channel-first maps is refused in one line."""
        ndim = getattr(self.task, "feature_map_ndim", None)
        if ndim is None:
            raise ConfigError(f"{self.method_name()} bounds the channels of channel-first feature maps, and "
                              f"the {self.task.name} task names no such layout for its models")
        return int(ndim)

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg = self.config
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            x = _inputs(train_set, device)
            ndim = self._map_ndim()
            order = activations_in_order(model, x[:2], ndim=ndim, skip_shared=True)
            if not order:
                layout = {3: "(N, C, P)", 4: "(N, C, H, W)"}.get(ndim, f"rank-{ndim}")
                raise ConfigError(f"{self.method_name()} bounds the channels of convolutional feature maps "
                                  f"{layout}, and no activation module of this model outputs one that it "
                                  "alone computes (e.g. a transformer's or an MLP's activations, or one ReLU "
                                  "module called by several layers)")
            chosen = order[: max(1, int(len(order) * cfg.layers))]
            insert_bounds(model, {name: channels for name, channels in chosen})  # +inf: the model as it was
            maxima = _clean_maxima(model, [n for n, _ in chosen], x)
            with torch.no_grad():
                ref = _logits(model, x)
                ref_pred, var = ref.argmax(1), ref.var().clamp_min(1e-12)
                sets = [(x, ref_pred)]
                if cfg.agreement_on == "clean+mixed":
                    mixed = mixed_images(x, ref_pred, cfg.seed)
                    sets.append((mixed, _logits(model, mixed).argmax(1)))
            setup = time.perf_counter() - t0
            best, c, history = self._learn(model, x, ref, sets, var, maxima, progress, callback)
            for name, r in best.items():
                model.get_submodule(name).bound.copy_(maxima[name] * r)
            with torch.no_grad():
                final = _agreement(model, sets)
                agree, agree_mixed = final[0], (final[1] if len(final) > 1 else None)
                held = None
                if holdout is not None and len(holdout):
                    held = _holdout_agreement(model, _inputs(holdout, device), [n for n, _ in chosen])
        finally:
            for p in frozen:
                p.requires_grad_(True)
            model.train(was_training)
        extra = {"bounded": {n: ch for n, ch in chosen},
                 "relative_bounds": {n: float(r.mean()) for n, r in best.items()}, "penalty_final": c, "agreement": agree, "mixed_agreement": agree_mixed,
                 "holdout_agreement": held}
        return Step(model, history, sum(ch for _, ch in chosen), {"setup": setup}, extra)

    def _learn(self, model, x, ref, sets, var, maxima, progress, callback):
        """The optimisation of the relative bounds (module doc); returns the kept bounds, the final
        ``c`` and one record per epoch. ``sets``: the ``(images, unclipped predictions)`` on which the
        agreement is required."""
        cfg = self.config
        rel = {n: torch.ones_like(m, requires_grad=True) for n, m in maxima.items()}
        best = {n: r.detach().clone() for n, r in rel.items()}
        opt = torch.optim.Adam(list(rel.values()), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        c = cfg.penalty
        history: list[dict[str, Any]] = []
        for epoch in tqdm(range(1, cfg.epochs + 1), desc="activation bounds", disable=not progress, leave=False):
            t0 = time.perf_counter()
            total, batches = 0.0, 0
            for j in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
                j = j.to(x.device)
                bounds = {f"{n}.bound": maxima[n] * r for n, r in rel.items()}
                fit = F.mse_loss(functional_call(model, bounds, (x[j],)), ref[j]) / var
                size = torch.stack([r.norm() / r.numel() ** 0.5 for r in rel.values()]).mean()
                loss = fit + c * size
                grads = torch.autograd.grad(loss, list(rel.values()))
                for r, g in zip(rel.values(), grads):
                    r.grad = g
                opt.step()
                with torch.no_grad():
                    for r in rel.values():
                        r.clamp_(0.0, 1.0)
                total, batches = total + float(loss.detach()), batches + 1
            with torch.no_grad():
                bounds = {f"{n}.bound": maxima[n] * r for n, r in rel.items()}
                agree = _agreement(model, sets, bounds)
            ok = min(agree) >= cfg.agreement
            if ok:
                best = {n: r.detach().clone() for n, r in rel.items()}
            rec = {"epoch": epoch, "loss": total / max(batches, 1), "agreement": agree[0], "penalty": c,
                   "mean_relative_bound": float(torch.cat([r.detach() for r in rel.values()]).mean()),
                   "kept": ok, "seconds": time.perf_counter() - t0}
            if len(agree) > 1:
                rec["mixed_agreement"] = agree[1]
            c = c * cfg.penalty_factor if ok else c / cfg.penalty_factor
            history.append(rec)
            if callback is not None:
                callback(rec)
        return best, c, history


def _clean_maxima(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel maximum of each named bounded module's output over ``x`` (all other dimensions)."""
    out: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_m, _i, o):
            m = o.detach().amax(dim=tuple(d for d in range(o.dim()) if d != 1))
            out[name] = m if name not in out else torch.maximum(out[name], m)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            _logits(model, x)
    finally:
        for h in handles:
            h.remove()
    return out


def _holdout_agreement(model: nn.Module, x: torch.Tensor, names: list[str]) -> float:
    """Share of ``x`` on which the bounded model predicts as it would without its bounds."""
    with torch.no_grad():
        clipped = _logits(model, x).argmax(1)
        free = {f"{n}.bound": torch.full_like(model.get_submodule(n).bound, float("inf")) for n in names}
        plain = _logits(model, x, free).argmax(1)
    return float((clipped == plain).float().mean())


def format_bounds(report: dict[str, Any]) -> str | None:
    """One line on the bounds a clipping run set (None if the report has none), e.g. ``activation
    bounds on 16 modules at 0.34 - 0.56 of their clean maxima (mean 0.43); the clipped model agrees with
    the unclipped one on 98.0 % of the clean images (hold-out 98.0 %)``."""
    rel = report.get("relative_bounds")
    if not rel:
        return None
    values = list(rel.values())
    out = (f"activation bounds on {len(values)} module{'s' if len(values) != 1 else ''} at "
           f"{min(values):.2f} - {max(values):.2f} of their clean maxima (mean {sum(values) / len(values):.2f}); "
           f"the clipped model agrees with the unclipped one on {100 * report['agreement']:.1f} % of the clean images")
    if report.get("mixed_agreement") is not None:
        out += f" and {100 * report['mixed_agreement']:.1f} % of their mixtures"
    if report.get("holdout_agreement") is not None:
        out += f" (hold-out {100 * report['holdout_agreement']:.1f} %)"
    return out


DEFENSES.register("act-clip", ActivationClip)
DEFENSES.register("act-clip-all", ActivationClip, layers=1.0)
