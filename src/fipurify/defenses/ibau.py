"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022, "Adversarial
Unlearning of Backdoors via Implicit Hypergradient").

Minimax unlearning on a small clean set:

    min_theta max_{||delta||_2 <= C} H(delta, theta) = 1/n sum_i CE(f_theta(x_i + delta), y_i)

Each round (one loop epoch) first solves the inner maximisation for one *universal*
perturbation ``delta`` (SGD on ``-CE(f(clip(x + delta)), f(x)) + pert_reg ||delta||^2``
over the clean set, projected onto the L2 ball of radius ``pert_norm`` after every step).
Then every batch takes an outer step along the implicit hypergradient

    dH/dtheta = d_theta L_out + (d_theta Phi)^T v,   v = (d_delta Phi)^T v + d_delta L_out,

where ``Phi(delta, theta) = delta - inner_lr * grad_delta L_in(delta, theta)`` is the inner
gradient-descent map whose fixed point is ``delta*``; ``v`` is found with
``fixed_point_steps`` (K) fixed-point iterations (a truncated Neumann series of the
implicit-function-theorem inverse). In the loop the second term enters as the
surrogate ``hyper = <Phi(delta, theta), v>`` (``v`` detached), whose gradient with respect to
theta is exactly ``(d_theta Phi)^T v``; its logged value is not a loss.

Defaults follow the authors' code and the FIP paper (A.3.3): Adam lr 1e-3, batch 100,
K = 5, inner step 0.1, perturbation SGD lr 10 with ``||delta||^2`` weight 1e-3, L2 radius
10, 10 rounds, model in eval mode; the outer loss perturbs ``perturb_share`` (1%, at least
one image) of each batch as their code does. Differences: the perturbation is projected
after every step (theirs rescales once at the end), and the inner map uses the current
batch (theirs always uses the first batch). ``pert_steps`` caps the batches spent on the
perturbation per round (0 = one pass, as theirs) for CPU-cheap runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .base import DEFENSES, Defense, DefenseConfig, EpochCallback, Step
from .loop import finetune, make_optimizer


@dataclass
class IBAUConfig(DefenseConfig):
    """I-BAU settings; defaults are the authors' CIFAR-10 ones (see the module docstring)."""
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 100
    milestones: tuple[int, ...] = ()
    augment: bool = False
    bn_mode: str = "eval"
    optimizer: str = "adam"
    fixed_point_steps: int = 5
    inner_lr: float = 0.1
    pert_lr: float = 10.0
    pert_reg: float = 1e-3
    pert_norm: float = 10.0
    pert_steps: int = 0
    perturb_share: float = 0.01

    def validate(self) -> "IBAUConfig":
        super().validate()
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if isinstance(self.fixed_point_steps, bool) or not isinstance(self.fixed_point_steps, int) \
                or self.fixed_point_steps < 1:
            raise ConfigError(f"fixed_point_steps must be an integer >= 1, got {self.fixed_point_steps!r}")
        if not isinstance(self.pert_steps, int) or self.pert_steps < 0:
            raise ConfigError(f"pert_steps must be an integer >= 0 (0 = one pass), got {self.pert_steps!r}")
        if not (self.inner_lr > 0 and self.pert_lr > 0 and self.pert_norm > 0):
            raise ConfigError("inner_lr, pert_lr and pert_norm must be positive")
        if self.pert_reg < 0:
            raise ConfigError(f"pert_reg must be >= 0, got {self.pert_reg}")
        if not 0 < self.perturb_share <= 1:
            raise ConfigError(f"perturb_share must lie in (0, 1], got {self.perturb_share}")
        return self


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """``delta`` scaled onto the L2 ball of ``radius`` when outside it (in place; returned)."""
    norm = delta.norm()
    if norm > radius:
        delta.mul_(radius / norm)
    return delta


def implicit_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                   perturbed: torch.Tensor, cfg: IBAUConfig) -> dict[str, torch.Tensor]:
    """The outer loss and the implicit-hypergradient surrogate of one batch.

    ``perturbed`` indexes the images that carry ``delta`` in the outer loss. The gradient of
    ``ce + hyper`` with respect to the model's parameters is the I-BAU hypergradient at
    ``delta`` (exact at the inner fixed point as ``fixed_point_steps`` grows).
    """
    d = delta.detach().clone().requires_grad_(True)
    k = len(perturbed)
    patch = torch.zeros_like(x).index_copy(0, perturbed, d.expand(k, *d.shape[1:]))
    outer = F.cross_entropy(model((x + patch).clamp(0, 1)), y)
    (g_out,) = torch.autograd.grad(outer, [d], retain_graph=True)
    inner = -F.cross_entropy(model((x + d).clamp(0, 1)), y) + cfg.pert_reg * d.pow(2).sum()
    (g_in,) = torch.autograd.grad(inner, [d], create_graph=True)
    phi = d - cfg.inner_lr * g_in  # one inner gradient step: delta* is its fixed point
    v = torch.zeros_like(d)
    for _ in range(cfg.fixed_point_steps):  # v = (d_delta Phi)^T v + d_delta L_out
        (jv,) = torch.autograd.grad(phi, [d], grad_outputs=v, retain_graph=True)
        v = jv + g_out
    return {"ce": outer, "hyper": (phi * v.detach()).sum()}


class IBAU(Defense):
    """Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

    Alternates between finding a universal, norm-bounded perturbation that maximises the
    clean loss (a stand-in for the unknown trigger) and updating the model to resist it.
    The model update follows the implicit hypergradient of the minimax problem, so it
    accounts for how the worst-case perturbation moves with the weights.
    """

    name = "i-bau"
    config_class = IBAUConfig
    tasks = ("image-classification",)
    task_reason = "its universal perturbation is clipped to the [0, 1] pixel range and aimed at the predicted class"

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: IBAUConfig = self.config
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        device = params[0].device
        x0 = train_set[0][0]
        delta = torch.zeros((1, *x0.shape), device=device)
        norms: list[float] = []
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        pert_s = [0.0]

        def find_perturbation(epoch: int) -> None:
            t0 = time.perf_counter()
            model.eval()
            d = torch.zeros_like(delta, requires_grad=True)
            opt = torch.optim.SGD([d], lr=cfg.pert_lr)
            loader = DataLoader(train_set, batch_size=min(cfg.batch_size, len(train_set)), shuffle=True,
                                generator=gen)
            steps = 0
            while True:
                for x, _ in loader:
                    x = x.to(device)
                    with torch.no_grad():
                        pred = model(x).argmax(1)
                    loss = -F.cross_entropy(model((x + d).clamp(0, 1)), pred) + cfg.pert_reg * d.pow(2).sum()
                    (g,) = torch.autograd.grad(loss, [d])  # leaves the model's .grad alone
                    d.grad = g
                    opt.step()
                    with torch.no_grad():
                        project_l2(d, cfg.pert_norm)
                    steps += 1
                    if cfg.pert_steps and steps >= cfg.pert_steps:
                        break
                if not cfg.pert_steps or steps >= cfg.pert_steps:
                    break
            delta.copy_(d.detach())
            norms.append(float(delta.norm()))
            pert_s[0] += time.perf_counter() - t0

        def hypergradient(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            k = max(1, int(cfg.perturb_share * len(x)))
            idx = torch.randperm(len(x), generator=gen)[:k].to(x.device)
            return implicit_terms(m, x, y, delta, idx, cfg)

        opt = make_optimizer(params, cfg, cfg.optimizer)
        history = finetune(model, params, train_set, cfg, holdout=holdout, optimizer=opt, progress=progress,
                           callback=callback, desc=self.name, objective=hypergradient, epoch_start=find_perturbation,
                           task=self.task)
        for rec, n in zip(history, norms):
            rec["pert_norm"] = n
        self.perturbation = delta.detach().cpu()
        return Step(model.eval(), history, sum(p.numel() for p in params),
                    {"setup": 0.0, "perturbation": pert_s[0]}, {"perturbation_norms": norms})


DEFENSES.register("i-bau", IBAU, **IBAU.paper_schedule())
