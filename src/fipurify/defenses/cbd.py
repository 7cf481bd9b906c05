"""CBD: Causality-inspired Backdoor Defense (Zhang et al., CVPR 2023, "Backdoor Defense via
Deconfounded Representation Learning").

The backdoor acts as a confounder: poisoned samples are learned through a shortcut much
faster than clean ones. CBD therefore

1. trains a *confounded* model ``f_B`` for a few epochs (``backdoor_epochs``, 5) with plain
   CE on the poisoned set; it captures mostly the backdoor path;
2. trains the clean model ``f_C`` from scratch with

   ``sum_i w_i CE(f_C(x_i), y_i) + mi_weight * I(z_C; z_B)``,
   ``w_i = l_B(i) / (l_B(i) + l_C(i))`` (normalised to mean 1),

   so samples that ``f_B`` fits easily (low ``l_B``: likely poisoned) get little weight,
   and the penalty pushes the clean model's features ``z_C`` to carry no information
   about the confounded model's features ``z_B``. ``I`` is estimated with a critic ``T``
   (2-layer MLP on ``[z_B, z_C]``, spectrally normalised: a Lipschitz, WGAN-style
   dependency estimate) as ``E_joint T - E_marginal T``, the marginal pairs being
   ``z_C`` rolled by one in the batch; ``T`` ascends this estimate, ``f_C`` descends it.

Defaults follow the authors' code: batch 64, SGD lr 0.1 (x0.1 at epochs 20 and 70),
momentum 0.9, weight decay 1e-4, Nesterov, 100 epochs; critic Adam lr 0.2 (x0.1 every
20 epochs), dropout 0.2, estimate scaled by 0.01. Differences, for cost: the critic
takes one step per batch interleaved with the model step (the code runs a separate
critic pass per epoch), and the MI term is on by default (the code's flag defaults to
off, but it is part of the method in the paper). CPU-cheap settings: fewer
``epochs``/``backdoor_epochs``; ``mi_weight=0`` drops the critic entirely.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..tasks import Task
from .base import EpochCallback
from .loop import finetune
from .training_time import TRAINING_DEFENSES, TrainingDefense, TrainingDefenseConfig, check_count, sgd, tag


@dataclass
class CBDConfig(TrainingDefenseConfig):
    """CBD settings; defaults are the authors' CIFAR-10 ones (see the module docstring)."""
    epochs: int = 100
    milestones: tuple[int, ...] = (20, 70)
    gamma: float = 0.1
    backdoor_epochs: int = 5
    mi_weight: float = 0.01
    critic_lr: float = 0.2
    critic_step_epochs: int = 20
    critic_dropout: float = 0.2

    def validate(self) -> "CBDConfig":
        super().validate()
        check_count("epochs", self.epochs, 1)
        check_count("backdoor_epochs", self.backdoor_epochs, 1)
        check_count("critic_step_epochs", self.critic_step_epochs, 1)
        if any(m < 1 for m in self.milestones) or not 0 < self.gamma <= 1:
            raise ConfigError("milestones must be epochs >= 1 and gamma lie in (0, 1]")
        if self.mi_weight < 0 or not self.critic_lr > 0:
            raise ConfigError("mi_weight must be >= 0 and critic_lr positive")
        if not 0 <= self.critic_dropout < 1:
            raise ConfigError(f"critic_dropout must lie in [0, 1), got {self.critic_dropout}")
        return self


class _Critic(nn.Module):
    """T(z_B, z_C): a 2-layer MLP whose weights are kept at spectral norm 1 (1-Lipschitz)."""

    def __init__(self, dim_b: int, dim_c: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim_b + dim_c, dim_c), nn.LeakyReLU(),
                                 nn.Dropout(dropout), nn.Linear(dim_c, 1))

    def forward(self, zb: torch.Tensor, zc: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([zb, zc], 1)).squeeze(1)

    def dependency(self, zb: torch.Tensor, zc: torch.Tensor) -> torch.Tensor:
        """E_joint T - E_marginal T; the marginal pairs z_B with z_C of the next sample."""
        return self(zb, zc).mean() - self(zb, torch.roll(zc, 1, 0)).mean()

    @torch.no_grad()
    def normalise(self) -> None:
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.weight.div_(torch.linalg.matrix_norm(m.weight, ord=2).clamp_min(1e-12))


def _features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = model.features(x)
    return z, model.classifier(z)


def _reinitialise(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class CBD(TrainingDefense):
    """Causality-inspired Backdoor Defense (Zhang et al., CVPR 2023).

    A briefly trained confounded model absorbs the backdoor shortcut; the clean model is then
    trained with per-sample weights that discount samples the confounded model fits easily,
    plus a penalty on the mutual information between the two models' features.
    """

    name = "cbd"
    config_class = CBDConfig
    tasks = ("classification",)
    task_reason = "it weights per-sample cross-entropies of a .features -> .classifier model's logits"

    def train(self, model: nn.Module, poisoned_train_set: Dataset | DataLoader, *, task: Task | str | None = None,
              progress: bool = True, callback: EpochCallback | None = None) -> nn.Module:
        cfg: CBDConfig = self.config
        t_start = time.perf_counter()
        data = self._prepare(model, poisoned_train_set, task)
        if not (hasattr(model, "features") and hasattr(model, "classifier")):
            raise ConfigError("CBD needs a model with .features and .classifier (every fipurify model has them)")
        t0 = time.perf_counter()
        backdoored = copy.deepcopy(model)  # independent initialisation, as in the reference code
        _reinitialise(backdoored, cfg.seed + 1)
        bparams = list(backdoored.parameters())
        loop_cfg = cfg.phase(cfg.backdoor_epochs)
        history = finetune(backdoored, bparams, data, loop_cfg, optimizer=sgd(bparams, loop_cfg), progress=progress,
                           callback=tag("backdoor", callback), desc="cbd: confounded model", task=self.task)
        backdoored.eval().requires_grad_(False)
        backdoor_s = time.perf_counter() - t0

        device = next(model.parameters()).device
        with torch.no_grad():
            x0 = data[0][0][None].to(device)
            dim_b, dim_c = backdoored.features(x0).shape[1], model.features(x0).shape[1]
        critic = _Critic(dim_b, dim_c, cfg.critic_dropout).to(device)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)

        def set_critic_lr(epoch: int) -> None:
            critic_opt.param_groups[0]["lr"] = cfg.critic_lr * 0.1 ** ((epoch - 1) // cfg.critic_step_epochs)

        def objective(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            zc, logits = _features_and_logits(m, x)
            with torch.no_grad():
                zb, logits_b = _features_and_logits(backdoored, x)
                loss_b = F.cross_entropy(logits_b, y, reduction="none")
            ce = F.cross_entropy(logits, y, reduction="none")
            w = loss_b / (loss_b + ce.detach() + 1e-8)
            w = w * len(w) / w.sum().clamp_min(1e-12)
            terms = {"wce": (w * ce).mean()}
            if cfg.mi_weight > 0:
                critic.train()
                critic_loss = -critic.dependency(zb, zc.detach())  # the critic ascends the estimate
                critic_opt.zero_grad(set_to_none=True)
                critic_loss.backward()
                critic_opt.step()
                critic.normalise()
                terms["mi"] = cfg.mi_weight * critic.dependency(zb, zc)
            return terms

        params = list(model.parameters())
        loop_cfg = cfg.phase(cfg.epochs, milestones=cfg.milestones, gamma=cfg.gamma)
        history += finetune(model, params, data, loop_cfg, optimizer=sgd(params, loop_cfg), progress=progress,
                            callback=tag("clean", callback), desc="cbd: clean model", objective=objective,
                            epoch_start=set_critic_lr if cfg.mi_weight > 0 else None, task=self.task)
        for p in critic.parameters():  # the critic's gradients are not the model's business
            p.grad = None
        total = time.perf_counter() - t_start
        self.make_report(data, sum(p.numel() for p in params),
                         {"total": total, "setup": backdoor_s, "train": total - backdoor_s,
                          "backdoor_model": backdoor_s}, history)
        return model.eval()


TRAINING_DEFENSES.register("cbd", CBD)
