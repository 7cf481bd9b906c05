"""FIP and f-FIP: Fisher Information guided Purification (Karim et al., CCS 2024).

Fine-tune a backdoored model on a small clean set with

    CE + eta_F * Tr(F) + eta_r / 2 * L_r,   L_r = sum_i diag(F_bar)_i (theta_i - theta_bar_i)^2

``Tr(F)`` (the trace of the Fisher information of the model's predictive distribution)
pushes the model towards a smooth minimum, where the backdoor does not survive;
``L_r`` anchors the parameters that matter for clean data (diag(F_bar), measured once
on the clean set at the initial weights) so clean accuracy is retained.

- ``space="weights"``: FIP(theta), every weight is trained.
- ``space="spectral"`` (f-FIP, the default): every Conv/Linear weight becomes
  ``U diag(relu(s + delta)) V^T`` from one SVD; only the shifts ``delta`` are trained,
  Tr(F) and L_r are taken with respect to delta, and the result is folded back into a
  plain model of the same architecture.

Biases and normalisation layers: frozen in f-FIP by default (``train_bias`` /
``train_norm`` unfreeze them; the penalties then cover them too); all trained in FIP.
The ablations of the paper's Table 7 are configurations of this one class
(``eta_f=0``, ``eta_r=0``, and vanilla FT = weights space with both at 0).

``trace="released"`` replaces the Tr(F) term by the term the authors' released script computes
(:mod:`fipurify.defenses.released`: zero-mean gradient noise, not Tr(F)), for comparing "what the
code does" with "what the paper says".

Any task (:mod:`fipurify.tasks`): "CE" is the task's loss, Tr(F) and diag(F_bar) are those of
the task's likelihood (``log p(y|x) = -task.per_sample_loss``), the clean set is augmented as the
task allows; the released term only exists for classification.

Logged per epoch (history, progress bar, JSON report): ``ce`` (the task loss); ``trf`` = eta_F * Tr(F) (or
``noise`` = eta_F * N for the released term) on the steps that evaluate it; ``anchor`` =
eta_r / 2 * L_r.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..curvature.fisher import diag_fisher, fisher_anchor_loss, fisher_trace, proximal_anchor_step, snapshot
from ..curvature.spectral import attach_spectral, fold_spectral
from ..errors import ConfigError
from ..tasks import Classification
from .base import DEFENSES, Defense, DefenseConfig, EpochCallback, Step
from .loop import finetune, make_optimizer
from .released import RELEASED_OBJECTIVE, RELEASED_REGIME, released_trace_term

ESTIMATORS = ("sampled", "exact", "empirical")
#: "fisher": the paper's eta_F * Tr(F); "released": the released script's noise term
TRACE_TERMS = ("fisher", "released")


@dataclass
class FIPConfig(DefenseConfig):
    """FIP / f-FIP settings; defaults are the CIFAR-10 preset (see :data:`PRESETS`)."""
    space: str = "spectral"
    eta_f: float = 1e-3
    eta_r: float = 5.0
    fisher_every: int = 10
    estimator: str = "exact"
    fisher_sub_batch: int = 32
    fisher_normalize: str = "mean"
    trace: str = "fisher"
    anchor_update: str = "proximal"
    optimizer: str = "sgd"
    train_bias: bool = False
    train_norm: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self) -> "FIPConfig":
        super().validate()
        if self.space not in ("spectral", "weights"):
            raise ConfigError(f"space must be 'spectral' (f-FIP) or 'weights' (FIP), got {self.space!r}")
        if self.eta_f < 0 or self.eta_r < 0:
            raise ConfigError("eta_f and eta_r must be >= 0")
        if self.fisher_every < 1:
            raise ConfigError(f"fisher_every must be >= 1, got {self.fisher_every}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown Tr(F) estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.trace not in TRACE_TERMS:
            raise ConfigError(f"trace must be one of {', '.join(TRACE_TERMS)}, got {self.trace!r}")
        if self.fisher_normalize not in ("none", "mean", "max"):
            raise ConfigError("fisher_normalize must be 'none', 'mean' or 'max'")
        if self.anchor_update not in ("proximal", "gradient"):
            raise ConfigError("anchor_update must be 'proximal' or 'gradient'")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError("optimizer must be 'sgd' or 'adam'")
        if self.fisher_sub_batch < 1:
            raise ConfigError("fisher_sub_batch must be >= 1")
        return self


class FIP(Defense):
    """Fisher Information guided Purification; f-FIP when ``space="spectral"``."""

    name = "fip"
    #: the README catalog's cells per registered name: (what it trains, objective)
    summary = {
        "ffip": ("only a shift `delta` of the singular values of every Conv/Linear weight "
                 "(`W = U diag(relu(s + delta)) V^T`, SVD frozen)",
                 "CE + eta_F Tr(F) + eta_r/2 L_r, with respect to delta"),
        "fip": ("all weights", "CE + eta_F Tr(F) + eta_r/2 L_r"),
        "ffip-no-trf": ("as `ffip`", "without Tr(F) / without L_r (ablations)"),
        "ffip-no-lr": ("as `ffip`", "without Tr(F) / without L_r (ablations)"),
        "ft": ("all weights", "CE only (vanilla fine-tuning)"),
        "fip-released": ("all weights", "what the authors' released script runs: CE + eta_F x (zero-mean "
                         "gradient noise), 2,000 steps ([why](docs/fip-calibration.md))"),
    }
    config_class = FIPConfig

    def _trainable(self, model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
        cfg: FIPConfig = self.config
        for p in model.parameters():
            p.requires_grad_(cfg.space == "weights")
        if cfg.space == "weights":
            params = [(n, p) for n, p in model.named_parameters() if _selected(n, cfg)]
            for n, p in model.named_parameters():
                p.requires_grad_(any(p is q for _, q in params))
        else:
            attach_spectral(model, include=list(cfg.include) or None, exclude=list(cfg.exclude) or None)
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            extra = []
            for mname, m in model.named_modules():
                is_norm = isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
                for pname, p in m.named_parameters(recurse=False):
                    if (cfg.train_norm and is_norm) or (cfg.train_bias and pname == "bias" and not is_norm):
                        p.requires_grad_(True)
                        extra.append((f"{mname}.{pname}", p))
            params += extra
        return [p for _, p in params], [n for n, _ in params]

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: FIPConfig = self.config
        task = self.task
        if cfg.trace == "released" and not isinstance(task, Classification):
            raise ConfigError(f"trace='released' indexes log-softmax outputs by label and needs a classification "
                              f"task, not {task.name}")
        t0 = time.perf_counter()
        params, names = self._trainable(model)
        setup_s = time.perf_counter() - t0  # the SVD time for f-FIP
        anchor = fdiag = None
        t0 = time.perf_counter()
        if cfg.eta_r > 0:
            fdiag = diag_fisher(model, DataLoader(train_set, batch_size=64, collate_fn=self.task.collate_fn), params,
                                normalize=cfg.fisher_normalize, task=task)
            anchor = snapshot(params)
        fisher_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        released = cfg.trace == "released"

        def objective(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            # the released term reuses the CE forward pass, as the authors' script does
            logits = task.forward(m, x, y)
            terms = {"ce": task.mean_loss(logits, y)}
            if cfg.eta_f > 0 and step % cfg.fisher_every == 0:
                terms["noise"] = cfg.eta_f * released_trace_term(logits, y, params, generator=gen)
            return terms

        def penalty(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            terms: dict[str, torch.Tensor] = {}
            if not released and cfg.eta_f > 0 and step % cfg.fisher_every == 0:
                trf = fisher_trace(m, x, params, estimator=cfg.estimator, y=y,
                                   sub_batch=cfg.fisher_sub_batch, generator=gen, task=task)
                terms["trf"] = cfg.eta_f * trf
            if cfg.eta_r > 0:
                if cfg.anchor_update == "gradient":
                    terms["anchor"] = 0.5 * cfg.eta_r * fisher_anchor_loss(params, anchor, fdiag)
                else:  # logged only; the term acts through the proximal step below
                    with torch.no_grad():
                        terms["anchor"] = 0.5 * cfg.eta_r * fisher_anchor_loss(params, anchor, fdiag)
            return terms

        def proximal(lr: float) -> None:
            proximal_anchor_step(params, anchor, fdiag, lr, cfg.eta_r)

        opt = make_optimizer(params, cfg, cfg.optimizer)
        history = finetune(model, params, train_set, cfg, holdout=holdout, penalty=penalty, optimizer=opt,
                           objective=objective if released else None,
                           post_step=proximal if cfg.eta_r > 0 and cfg.anchor_update == "proximal" else None,
                           progress=progress, callback=callback, desc=self.method_name(), task=task)
        if cfg.space == "spectral":
            fold_spectral(model)
        for p in model.parameters():
            p.requires_grad_(True)
        return Step(model.eval(), history, sum(p.numel() for p in params),
                    {"setup": setup_s, "fisher_diag": fisher_s}, {"trainable_tensors": len(names)})

    def method_name(self) -> str:
        cfg: FIPConfig = self.config
        if cfg.space == "weights":
            return "ft" if cfg.eta_f == 0 and cfg.eta_r == 0 else "fip"
        return "ffip"


def _selected(name: str, cfg: FIPConfig) -> bool:
    mod = name.rsplit(".", 1)[0]
    if cfg.include and not any(fnmatch.fnmatch(mod, pat) for pat in cfg.include):
        return False
    return not any(fnmatch.fnmatch(mod, pat) for pat in cfg.exclude)


# Ablations are configurations, not forks.
DEFENSES.register("ffip", FIP, space="spectral")
DEFENSES.register("fip", FIP, space="weights")
DEFENSES.register("ffip-no-trf", FIP, space="spectral", eta_f=0.0)
DEFENSES.register("ffip-no-lr", FIP, space="spectral", eta_r=0.0)
DEFENSES.register("ft", FIP, space="weights", eta_f=0.0, eta_r=0.0)
# the authors' released script: its noise term in its regime (fipurify.defenses.released)
DEFENSES.register("fip-released", FIP, **{**RELEASED_OBJECTIVE, **RELEASED_REGIME})
