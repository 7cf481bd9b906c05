"""NFT: Neural mask Fine-Tuning (Karim et al., ECCV 2024, "Augmented Neural Fine-Tuning for
Efficient Backdoor Purification").

The weights stay frozen; every batch-norm channel ``c`` of layer ``l`` gets a mask
``m_{l,c}`` (initialised to 1) that multiplies its scale, ``gamma_{l,c} -> m_{l,c} gamma_{l,c}``
(the shift ``beta`` is left alone). The masks minimise the MixUp loss on the clean set plus
a mask regulariser that limits the drift from the original model::

    x~ = lam x_i + (1 - lam) x_j,  y~ = lam e_{y_i} + (1 - lam) e_{y_j},  lam ~ Beta(a, a)
    L(m) = CE(f_m(x~), y~) + eta / N_c * sum_{l,c} |1 - m_{l,c}|

with ``N_c`` the clean images per class. After every step each mask is clipped to
``[alpha * exp(-beta * l), 1]`` (``l`` = 1, 2, ... in module order): the "scheduling
function" that lets deep layers move further than shallow ones. The purified model is a
plain copy of the input with the masks folded into the BN scales (``gamma <- m * gamma``).

Defaults: the authors' code (github.com/nazmul-karim170/NFT, ``Remove_Backdoor.py``): masks on
BN weights only, SGD lr 0.05 with momentum 0.95, no weight decay, batch 128, MixUp with
``a = 1``, ``eta = 0.001``, ``alpha = 0.8``, ``beta = 0.5``, random crop + flip, model in train
mode (BN normalises with batch statistics and updates its running ones), 1000 mask
iterations drawn with replacement in 5 blocks of 200 (here 5 epochs of
``steps_per_epoch = 200``), the lr decayed per block by a cosine from 0.05 to 0.02 over the
5 blocks. Their clean set is 1% of the training data (``--val-ratio 0.01``: 500 CIFAR-10
images), as ours; the hold-out (10%) only reports accuracy.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import DEFENSES, EpochCallback, Step
from .baseline_common import BaselineConfig, BaselineDefense
from .loop import finetune, make_optimizer
from .rnp import batchnorm_layers


@dataclass
class NFTConfig(BaselineConfig):
    """NFT settings (see the module docstring for their source): ``epochs`` x ``steps_per_epoch``
    mask iterations (batches drawn with replacement), ``lr``/``momentum`` the mask optimizer's,
    ``min_lr`` the end of the cosine decay, ``mixup_alpha`` the Beta parameter, ``eta`` the
    regulariser weight, ``mask_alpha``/``mask_beta`` the layer-wise lower clip
    ``mask_alpha * exp(-mask_beta * l)``."""
    epochs: int = 5
    steps_per_epoch: int = 200
    lr: float = 0.05
    momentum: float = 0.95
    weight_decay: float = 0.0
    batch_size: int = 128
    milestones: tuple[int, ...] = ()
    schedule: str = "cosine"
    min_lr: float = 0.02
    mixup_alpha: float = 1.0
    eta: float = 0.001
    mask_alpha: float = 0.8
    mask_beta: float = 0.5

    def validate(self) -> "NFTConfig":
        super().validate()
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must lie in [0, lr], got {self.min_lr}")
        if not self.mixup_alpha > 0:
            raise ConfigError(f"mixup_alpha (the Beta parameter of MixUp) must be positive, got {self.mixup_alpha}")
        if self.eta < 0:
            raise ConfigError(f"eta (the mask regulariser weight) must be >= 0, got {self.eta}")
        if not (0 <= self.mask_alpha <= 1 and self.mask_beta >= 0):
            raise ConfigError(f"mask_alpha must lie in [0, 1] and mask_beta be >= 0, "
                              f"got {self.mask_alpha}, {self.mask_beta}")
        return self


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp (Zhang et al., ICLR 2018): each image blended with a random partner of the batch
    by one ``lam ~ Beta(alpha, alpha)``. Returns the mixed images, the soft labels
    ``lam * onehot(y) + (1 - lam) * onehot(y[perm])`` and ``lam``."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    if generator is None:
        lam = float(beta.sample())
    else:  # a seeded draw: Beta(a, a) as a ratio of two seeded Gamma draws
        ga = torch._standard_gamma(torch.full((2,), float(alpha)), generator=generator)
        lam = float(ga[0] / ga.sum())
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm], lam


def lower_bounds(n_layers: int, alpha: float, beta: float) -> list[float]:
    """The scheduling function: mask ``l`` (1-based, module order) lives in ``[alpha e^{-beta l}, 1]``."""
    return [alpha * math.exp(-beta * (i + 1)) for i in range(n_layers)]


def _scale_hook(mask: torch.Tensor):
    """Forward hook turning a BN output ``gamma x_hat + beta`` into ``m gamma x_hat + beta``."""
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *([1] * (output.dim() - 2)))
        bias = module.bias.view(shape)
        return (output - bias) * mask.view(shape) + bias
    return hook


class NFT(BaselineDefense):
    """Neural mask Fine-Tuning (Karim et al., ECCV 2024).

    Instead of the weights it fine-tunes one multiplicative mask per batch-norm channel, on
    MixUp-augmented clean data (a cheap stand-in for trigger synthesis), with a regulariser
    keeping the masks near 1 so that the model does not drift. Masks of backdoor-serving
    channels shrink; the learnt masks are folded into the BN scales of a plain copy.
    """

    name = "nft"
    summary = "Augmented Neural Fine-Tuning (BatchNorm masks, MixUp)"
    config_class = NFTConfig
    tasks = ("classification",)
    task_reason = "its MixUp objective mixes one-hot class labels (a soft-label cross-entropy)"

    def check_model(self, model: nn.Module) -> None:
        if not batchnorm_layers(model):
            raise ConfigError("NFT fine-tunes masks on batch-norm channels, and this model has no "
                              "(affine) batch-norm layer")

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: NFTConfig = self.config
        t_start = time.perf_counter()
        work = model.requires_grad_(False)  # only the masks train
        layers = batchnorm_layers(work)
        masks = [torch.ones(bn.num_features, device=bn.weight.device, requires_grad=True) for _, bn in layers]
        bounds = lower_bounds(len(masks), cfg.mask_alpha, cfg.mask_beta)
        with torch.no_grad():
            x0, _ = train_set[0]
            num_classes = int(work.eval()(torch.as_tensor(x0)[None].to(masks[0].device)).shape[-1])
        per_class = len(train_set) / num_classes  # N_c
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        lams: list[float] = []

        def mixed_ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            xm, soft, lam = mixup(x, y, num_classes, cfg.mixup_alpha, gen)
            lams.append(lam)
            return {"mix_ce": torch.sum(-soft * F.log_softmax(m(xm), dim=1), dim=1).mean()}

        def regulariser(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            return {"mask_reg": cfg.eta / per_class * sum((1 - mk).abs().sum() for mk in masks)}

        @torch.no_grad()
        def clip(lr: float) -> None:
            for mk, low in zip(masks, bounds):
                mk.clamp_(low, 1.0)

        def cosine(opt: torch.optim.Optimizer):
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.min_lr)

        handles = [bn.register_forward_hook(_scale_hook(mk)) for (_, bn), mk in zip(layers, masks)]
        setup_s = time.perf_counter() - t_start
        try:
            history = finetune(work, masks, train_set, cfg, holdout=holdout, penalty=regulariser,
                               objective=mixed_ce, optimizer=make_optimizer(masks, cfg), post_step=clip,
                               scheduler=cosine if cfg.schedule == "cosine" else self.scheduler(),
                               progress=progress, callback=callback, desc=self.name, task=self.task)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():  # fold: gamma <- m * gamma (beta untouched, as the masks never scaled it)
            for (_, bn), mk in zip(layers, masks):
                bn.weight.mul_(mk)
        purified = work.requires_grad_(True).eval()
        values = torch.cat([mk.detach() for mk in masks])
        self.masks = {name: mk.detach().cpu() for (name, _), mk in zip(layers, masks)}
        return Step(purified, history, int(values.numel()), {"setup": setup_s},
                    {"n_masks": int(values.numel()), "n_layers": len(masks),
                     "mask_mean": float(values.mean()), "mask_min": float(values.min()),
                     "mask_below_half": int((values < 0.5).sum()),
                     "mask_sparsity": float((values < 0.5).float().mean()),
                     "mask_at_lower_bound": int(sum(int((mk.detach() <= low + 1e-6).sum())
                                                    for mk, low in zip(masks, bounds))),
                     "per_layer_mask_mean": {name: float(mk.mean()) for name, mk in self.masks.items()},
                     "mixup_lambda_mean": float(sum(lams) / max(len(lams), 1)), "images_per_class": per_class})


DEFENSES.register("nft", NFT, **NFT.paper_schedule())
