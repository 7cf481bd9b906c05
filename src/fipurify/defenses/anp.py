"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021, "Adversarial Neuron Pruning
Purifies Backdoored Deep Models").

Each neuron (a channel of a normalisation layer, gamma * x_hat + beta) gets a mask m in [0, 1];
the masks minimise alpha * CE(masked model) + (1 - alpha) * CE(masked model under the worst
multiplicative neuron perturbation), the perturbation (gamma * (m + delta), beta * (1 + xi)
with |delta|, |xi| <= eps) found by signed-gradient ascent from a random start.
Backdoor neurons are the ones whose perturbation most easily collapses the model; their masks
go to 0, and neurons with mask < threshold are pruned.

Pruning sets the neuron's gamma to 0 (what mask = 0 means, as in the paper's code; beta is
kept), in a copy of the input model: a plain model of the same class.
Defaults: the authors' code (github.com/csdongxian/ANP_backdoor): eps 0.4, one perturbation
step, alpha 0.2, mask lr 0.2 with momentum 0.9, batch 128, threshold 0.2; their 2000
iterations are 500 epochs of a 500-image clean set (the FIP paper's 500 epochs, A.3.3).
The FIP paper's appendix states lr 0.02; we keep the authors' 0.2.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import DEFENSES, EpochCallback, Step
from .baseline_common import BaselineConfig, BaselineDefense, copy_of
from .loop import finetune, make_optimizer


@dataclass
class ANPConfig(BaselineConfig):
    """ANP settings: ``lr`` is the mask learning rate; ``eps`` the perturbation budget,
    ``steps`` its ascent steps, ``alpha`` the weight of the unperturbed loss, ``threshold``
    the mask value under which a neuron is pruned."""
    epochs: int = 500
    lr: float = 0.2
    batch_size: int = 128
    milestones: tuple[int, ...] = ()
    eps: float = 0.4
    steps: int = 1
    alpha: float = 0.2
    threshold: float = 0.2

    def validate(self) -> "ANPConfig":
        super().validate()
        if not 0 <= self.eps < 1:
            raise ConfigError(f"eps must lie in [0, 1), got {self.eps}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold must lie in [0, 1], got {self.threshold}")
        return self


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, channel dim)`` of every affine BatchNorm (channels on dim 1) and every
    affine 1-D LayerNorm (channels last)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            out.append((name, m, 1))
        elif isinstance(m, nn.LayerNorm) and m.weight is not None and len(m.normalized_shape) == 1:
            out.append((name, m, -1))
    return out


class NeuronPerturbation:
    """Masks and perturbations on the neurons of ``model``'s normalisation layers, applied by
    forward hooks: ``out = gamma * x_hat * (m [+ delta]) + beta [* (1 + xi)]``."""

    def __init__(self, model: nn.Module, eps: float):
        self.layers = neuron_layers(model)
        if not self.layers:
            raise ConfigError("ANP needs batch-norm (or layer-norm) layers with affine parameters")
        dev = self.layers[0][1].weight.device
        self.eps = eps
        self.perturb = False
        self.masks = [nn.Parameter(torch.ones(m.weight.numel(), device=dev)) for _, m, _ in self.layers]
        self.noise_w = [nn.Parameter(torch.zeros_like(q)) for q in self.masks]
        self.noise_b = [nn.Parameter(torch.zeros_like(q)) for q in self.masks]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m, _) in enumerate(self.layers)]

    def _hook(self, i: int):
        _, module, dim = self.layers[i]

        def hook(_m, _inp, out):
            shape = [1] * out.dim()
            shape[dim] = -1
            beta = module.bias.view(shape) if module.bias is not None else torch.zeros((), device=out.device)
            coeff, bias = self.masks[i], beta
            if self.perturb:
                coeff = coeff + self.noise_w[i]
                bias = beta * (1 + self.noise_b[i].view(shape))
            return (out - beta) * coeff.view(shape) + bias
        return hook

    @torch.no_grad()
    def reset_noise(self, generator: torch.Generator) -> None:
        """A random start in [-eps, eps] for every perturbation."""
        for q in self.noise_w + self.noise_b:
            q.copy_((torch.rand(q.shape, generator=generator) * 2 - 1).mul_(self.eps).to(q.device))

    @torch.no_grad()
    def clip(self) -> None:
        for q in self.noise_w + self.noise_b:
            q.clamp_(-self.eps, self.eps)
        for q in self.masks:
            q.clamp_(0.0, 1.0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ANP(BaselineDefense):
    """Adversarial Neuron Pruning: learn neuron masks under adversarial neuron perturbation, prune low masks."""

    name = "anp"
    config_class = ANPConfig

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: ANPConfig = self.config
        purified = model  # pruned at the end; the masks train on another copy
        work = copy_of(model)  # only the masks are trained; its weights stay as they are
        for p in work.parameters():
            p.requires_grad_(False)
        pert = NeuronPerturbation(work, cfg.eps)
        mask_opt = make_optimizer(pert.masks, cfg)
        noise_opt = torch.optim.SGD(pert.noise_w + pert.noise_b, lr=cfg.eps / cfg.steps) if cfg.eps > 0 else None
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        task = self.task

        def anp_step(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            rob = torch.zeros((), device=x.device)
            if noise_opt is not None:
                pert.reset_noise(gen)
                pert.perturb = True
                for _ in range(cfg.steps):  # maximise the loss over the perturbation
                    noise_opt.zero_grad(set_to_none=True)
                    (-task.loss(m, x, y)).backward()
                    for q in pert.noise_w + pert.noise_b:  # a signed step of eps / steps, as the paper's code
                        if q.grad is not None:
                            q.grad.sign_()
                    noise_opt.step()
                    pert.clip()
                rob = task.loss(m, x, y)
            pert.perturb = False
            nat = task.loss(m, x, y)
            mask_opt.zero_grad(set_to_none=True)
            (cfg.alpha * nat + (1 - cfg.alpha) * rob).backward()
            mask_opt.step()
            pert.clip()
            return {"ce": nat, "adv_ce": rob}

        try:
            history = finetune(work, pert.masks, train_set, cfg, holdout=holdout, optimizer=mask_opt,
                               step_fn=anp_step, scheduler=self.scheduler(), progress=progress,
                               callback=callback, desc=self.name, task=task)
        finally:
            pert.remove()
        t0 = time.perf_counter()
        self.masks = {name: q.detach().cpu().clone() for (name, _, _), q in zip(pert.layers, pert.masks)}
        mods = dict(purified.named_modules())
        pruned: dict[str, list[int]] = {}
        with torch.no_grad():
            for name, mask in self.masks.items():
                idx = torch.nonzero(mask < cfg.threshold).flatten().tolist()
                if idx:
                    mods[name].weight[idx] = 0.0
                    pruned[name] = idx
        n_neurons = sum(q.numel() for q in pert.masks)
        return Step(purified.eval(), history, n_neurons, {"setup": 0.0, "prune": time.perf_counter() - t0},
                    {"pruned_neurons": pruned, "n_pruned": sum(len(v) for v in pruned.values()),
                     "n_neurons": n_neurons, "threshold": cfg.threshold,
                     "mask_min": float(min(q.detach().min() for q in pert.masks)),
                     "mask_mean": float(sum(q.detach().sum() for q in pert.masks) / n_neurons)})


DEFENSES.register("anp", ANP, **ANP.paper_schedule())
