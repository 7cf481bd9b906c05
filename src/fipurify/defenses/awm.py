"""AWM: Adversarial Weight Masking (Chai & Chen, NeurIPS 2022, "One-shot Neural Backdoor
Erasing via Adversarial Weight Masking").

Learn a soft mask ``m in [0, 1]`` (one entry per weight, initialised to 1) over the
convolution weights of a frozen backdoored model, alternating two steps each epoch:

1. *Trigger recovery* (inner maximisation, ``epoch_start``). Default (``trigger="additive"``,
   the authors' code): a universal additive perturbation ``delta`` (C x H x W), started at 0
   every epoch, takes plain SGD steps (``trigger_lr`` 10) that *maximise*
   ``CE(f_m(x + delta), f_m(x).argmax())`` over one pass of the clean set; its L1 norm is
   then capped at ``trigger_norm`` (eta) and ``x' = clip(x + delta, 0, 1)``.
   ``trigger="mask-pattern"``: a Neural-Cleanse-style trigger ``x' = (1 - M) x + M P``
   (mask 1 x H x W, pattern C x H x W, through sigmoids, Adam ``trigger_lr`` 0.1, warm-started
   across epochs) maximising ``CE(f_m(x'), y) - beta ||M||_1``, ``||M||_1`` capped at eta.
2. *Weight masking* (outer minimisation, through the shared loop):

   ``alpha CE(f_m(x), y) + (1 - alpha) CE(f_m(x'), y) + gamma ||m||_1``

   with ``m`` clipped to [0, 1] after every step, so clean accuracy stays and the
   recovered trigger no longer works.

The purified model is the original architecture with ``W <- m * W``.

Defaults: FIP paper A.3.3 for CIFAR-10/GTSRB (100 epochs, Adam lr 0.01, alpha 0.9, beta
0.1, gamma 1e-8 = ``mask_l1``, eta 1000 = ``trigger_norm``), and the authors' code
(github.com/jinghuichen/AWM) otherwise: batch 128, lr x0.9 every 5 epochs, model in eval
mode, no augmentation, convolution weights masked (``mask_linear`` adds the linear layers),
the additive trigger above (their code has no beta term; beta applies to the mask-pattern
trigger only), and no weight decay on the masks. A.3.3's weight decay 1e-3 is not the
default: as the coupled L2 of ``torch.optim.Adam``, whose steps are normalised per mask, it
shrinks every mask whose loss gradient is smaller by about ``lr`` per step, whatever the
mask does. Measured on the CPU-preset BadNets model, 500 clean images, 20 epochs: weight
decay 1e-3 left 94 % of the masks below 0.5 and clean accuracy at 53 % (ASR 31.5 %); none
kept ACC 79.3 % and cut ASR from 100 % to 5.1 %. The mask-pattern trigger with no weight
decay left ASR at 99.7 % (ACC 80.4 %): it does not find this backdoor.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .base import DEFENSES, Defense, DefenseConfig, EpochCallback, Step
from .loop import finetune, make_optimizer


@dataclass
class AWMConfig(DefenseConfig):
    """AWM settings; defaults are the CIFAR-10 ones (see the module docstring)."""
    epochs: int = 100
    lr: float = 0.01
    weight_decay: float = 0.0
    batch_size: int = 128
    milestones: tuple[int, ...] = tuple(range(5, 100, 5))
    gamma: float = 0.9
    augment: bool = False
    bn_mode: str = "eval"
    alpha: float = 0.9
    beta: float = 0.1
    mask_l1: float = 1e-8
    trigger_norm: float = 1000.0
    trigger: str = "additive"
    trigger_lr: float | None = None
    trigger_steps: int = 0
    mask_linear: bool = False

    def resolved_trigger_lr(self) -> float:
        """The trigger step size: 10 (SGD, additive) or 0.1 (Adam, mask-pattern) unless set."""
        if self.trigger_lr is not None:
            return float(self.trigger_lr)
        return 10.0 if self.trigger == "additive" else 0.1

    def validate(self) -> "AWMConfig":
        super().validate()
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.beta < 0 or self.mask_l1 < 0:
            raise ConfigError("beta and mask_l1 must be >= 0")
        if self.trigger not in ("additive", "mask-pattern"):
            raise ConfigError(f"trigger must be 'additive' or 'mask-pattern', got {self.trigger!r}")
        if not (self.trigger_norm > 0 and (self.trigger_lr is None or self.trigger_lr > 0)):
            raise ConfigError("trigger_norm and trigger_lr must be positive")
        if not isinstance(self.trigger_steps, int) or self.trigger_steps < 0:
            raise ConfigError(f"trigger_steps must be an integer >= 0 (0 = one pass), got {self.trigger_steps!r}")
        return self


def _cap_l1(t: torch.Tensor, eta: float) -> torch.Tensor:
    """``t`` scaled down so that ``||t||_1 <= eta`` (unchanged when it already is)."""
    return t * min(1.0, eta / max(float(t.abs().sum()), 1e-12))


class _SoftMask(nn.Module):
    """Parametrisation ``W -> m * W`` with a trainable mask ``m`` of W's shape (starts at 1)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.mask = nn.Parameter(torch.ones_like(weight))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.mask * weight


class AWM(Defense):
    """Adversarial Weight Masking (Chai & Chen, NeurIPS 2022).

    Alternately recovers a worst-case trigger (mask and pattern, L1-penalised) on clean data
    and learns sparse soft masks in [0, 1] over the weights that keep the clean loss low while
    making the recovered trigger ineffective; the masks are then multiplied into the weights.
    """

    name = "awm"
    config_class = AWMConfig
    tasks = ("image-classification",)
    task_reason = "it recovers a pixel trigger (a C x H x W pattern and H x W mask, inputs clipped to [0, 1])"

    def _masked_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        kinds = (nn.Conv2d, nn.Linear) if self.config.mask_linear else (nn.Conv2d,)
        return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: AWMConfig = self.config
        t_start = time.perf_counter()
        purified = copy.deepcopy(model)  # the masks are folded into this untouched copy at the end
        work = model
        work.requires_grad_(False)
        layers = self._masked_layers(work)
        if not layers:
            raise ConfigError("AWM found no convolution layer to mask (set mask_linear=True for linear layers)")
        for _, m in layers:
            parametrize.register_parametrization(m, "weight", _SoftMask(m.weight))
        masks = [m.parametrizations.weight[0].mask for _, m in layers]
        device = masks[0].device
        c, h, w = train_set[0][0].shape
        trigger = {"mask": torch.zeros(1, 1, h, w, device=device), "pattern": torch.zeros(1, c, h, w, device=device),
                   "delta": torch.zeros(1, c, h, w, device=device)}
        trig_l1: list[float] = []
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        trig_s = [0.0]
        setup_s = time.perf_counter() - t_start
        additive = cfg.trigger == "additive"
        lr_t = cfg.resolved_trigger_lr()

        # mask-pattern: the trigger persists across epochs (warm start), adapted to the current masks.
        mask_logit = torch.full((1, 1, h, w), -3.0, device=device, requires_grad=True)  # starts small
        pattern_logit = torch.randn((1, c, h, w), generator=gen).to(device).requires_grad_(True)
        trig_opt = None if additive else torch.optim.Adam([mask_logit, pattern_logit], lr=lr_t)

        def recover_trigger(epoch: int) -> None:
            t0 = time.perf_counter()
            work.eval()
            loader = DataLoader(train_set, batch_size=min(cfg.batch_size, len(train_set)), shuffle=True,
                                generator=gen)
            delta = torch.zeros(1, c, h, w, device=device, requires_grad=True)  # additive: restarts every epoch
            for i, (x, y) in enumerate(loader):
                if cfg.trigger_steps and i >= cfg.trigger_steps:
                    break
                x, y = x.to(device), y.to(device)
                if additive:
                    with torch.no_grad():
                        pred = work(x).argmax(1)  # the model's own labels, as the authors' code
                    loss = -F.cross_entropy(work(x + delta), pred)
                    (g,) = torch.autograd.grad(loss, [delta])  # the masks' .grad stay untouched
                    with torch.no_grad():
                        delta.sub_(lr_t * g)  # plain SGD ascent step on CE
                    continue
                mk, pt = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
                loss = -F.cross_entropy(work((1 - mk) * x + mk * pt), y) + cfg.beta * mk.sum()
                grads = torch.autograd.grad(loss, [mask_logit, pattern_logit])
                for p, g in zip((mask_logit, pattern_logit), grads):
                    p.grad = g
                trig_opt.step()
            with torch.no_grad():
                if additive:
                    trigger["delta"] = _cap_l1(delta.detach(), cfg.trigger_norm)
                    trig_l1.append(float(trigger["delta"].abs().sum()))
                else:
                    trigger["mask"] = _cap_l1(torch.sigmoid(mask_logit), cfg.trigger_norm)
                    trigger["pattern"] = torch.sigmoid(pattern_logit)
                    trig_l1.append(float(trigger["mask"].sum()))
            trig_s[0] += time.perf_counter() - t0

        def triggered(x: torch.Tensor) -> torch.Tensor:
            if additive:
                return (x + trigger["delta"]).clamp(0.0, 1.0)
            return (1 - trigger["mask"]) * x + trigger["mask"] * trigger["pattern"]

        def objective(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            xt = triggered(x)
            terms = {"nat": cfg.alpha * self.task.loss(m, x, y)}
            if cfg.alpha < 1:
                terms["rob"] = (1 - cfg.alpha) * F.cross_entropy(m(xt), y)
            if cfg.mask_l1 > 0:
                terms["l1"] = cfg.mask_l1 * sum(mk.abs().sum() for mk in masks)
            return terms

        @torch.no_grad()
        def clip(lr: float) -> None:
            for mk in masks:
                mk.clamp_(0.0, 1.0)

        opt = make_optimizer(masks, cfg, "adam")
        history = finetune(work, masks, train_set, cfg, holdout=holdout, optimizer=opt, post_step=clip,
                           progress=progress, callback=callback, desc=self.name, objective=objective,
                           epoch_start=recover_trigger, task=self.task)
        for rec, l1 in zip(history, trig_l1):
            rec["trigger_l1"] = l1

        # Fold the masks into the untouched copy: same class, same state-dict keys and order.
        named = dict(purified.named_modules())
        with torch.no_grad():
            for (name, _), mk in zip(layers, masks):
                named[name].weight.mul_(mk.detach().clamp(0, 1))
        values = torch.cat([mk.detach().flatten() for mk in masks])
        keep = ("delta",) if additive else ("mask", "pattern")
        self.trigger = {k: trigger[k].detach().cpu() for k in keep}
        return Step(purified.eval(), history, values.numel(), {"setup": setup_s, "trigger": trig_s[0]},
                    {"masked_layers": [n for n, _ in layers], "mask_mean": float(values.mean()),
                     "mask_below_half": float((values < 0.5).float().mean()), "trigger_l1": trig_l1})


DEFENSES.register("awm", AWM, **AWM.paper_schedule())
