"""SAU, Shared Adversarial Unlearning (Wei et al., NeurIPS 2023, "Shared Adversarial Unlearning:
Backdoor Mitigation by Unlearning Shared Adversarial Examples").

A frozen copy of the backdoored model ``h0`` is the reference. Poisoned inputs are adversarial
examples that ``h0`` sends to the target class; the paper bounds the purified model's backdoor
risk by its risk on *shared* adversarial examples (SAEs): perturbed inputs that fool both
``h0`` and the model ``h`` being purified, towards the same label. Each batch therefore

1. (maximisation) runs per-sample L-inf PGD on ``delta`` (``|delta|_inf <= eps``, ``x + delta``
   kept in [0, 1]) ascending

       adv_weight * L_adv + share_weight * L_share,
       L_adv   = 1/(2B) [sum_{i: h not fooled} CE(h(x_i+d_i), y_i) + sum_{i: h0 not fooled} CE(h0(x_i+d_i), y_i)]
       L_share = -1/B sum_{i not shared} JS(softmax h(x_i+d_i) || softmax h0(x_i+d_i))

   (make both models wrong, and make them agree where they do not yet);
2. (minimisation) takes one optimizer step on

       clean_weight * CE(h(x), y) + sar_weight * L_sar + at_weight * CE(h(x~), y),
       L_sar = 1/B sum_{i: h0(x~_i) != y_i, h0(x~_i) != h0(x_i)} -log(1 - p_h(h0(x~_i) | x~_i)),

   i.e. on every example that fools the reference, the purified model is pushed off the
   reference's adversarial label (the relaxed indicator of "h(x~) = h0(x~) != y"), so the two
   models stop sharing adversarial examples and the backdoor shortcut is unlearned.
   ``at_weight`` is the optional plain adversarial-training term of the authors' code.

"Fooled" means: predicts neither the true label nor the model's own clean prediction.

Defaults, from the paper's experimental setup ("PGD 5 steps with norm bound 0.2",
"lambda_1 = lambda_2 = lambda_4 = 1 and lambda_3 = 0.01", "100 epochs in CIFAR-10 and GTSRB")
and the authors' BackdoorBench CIFAR-10 config ``config/defense/sau/config.yaml`` with
``defense/sau.py``: L-inf bound ``eps`` 0.2 (``trigger_norm``), 5 steps (``adv_steps``) of size
0.2 (``adv_lr``), started at ``+eps`` (``pgd_init: max``); clean_weight = sar_weight = 1
(``lmd_1``, ``lmd_3``), share_weight 1 (``beta_2``), adv_weight 0.01 (``beta_1``), which are the
paper's four lambdas; at_weight 0 (``lmd_2: 0``, "by default AT is not used"); 100 epochs;
Adam, lr 1e-4, betas (0.9, 0.999), no weight decay, batch 256 (config); the whole
model in eval mode during the attack and the update (the code's default, no ``--train_mode``)
and no augmentation (the code's test-time transform). The config names a cosine schedule,
but the authors' loop never steps it, so the learning rate stays at 1e-4 (here: no milestones).

Differences: the paper gives every defense 5% of the training set (2,500 CIFAR-10 images);
fipurify gives every method the same clean set (500 images), minus the hold-out. Our PGD keeps
``x + delta`` in [0, 1] (the authors leave that clip out, calling it optional), stops as soon
as every example of the batch is shared (theirs after the next step), and uses the same
"fooled" test in the attack and the update (the attack in their code compares with the clean
prediction only; both agree for correctly classified images). L_sar is evaluated in the
log-sum-exp form log(1 - p_r) = logsumexp_{k != r} z_k - logsumexp_k z_k (exact and stable)
instead of the code's clamped average of two forms.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import DEFENSES, EpochCallback, Step
from .baseline_common import BaselineConfig, BaselineDefense
from .loop import finetune, make_optimizer

PGD_INITS = ("max", "zero", "random")


@dataclass
class SAUConfig(BaselineConfig):
    """SAU settings (see the module docstring for where each default comes from)."""
    epochs: int = 100
    lr: float = 1e-4
    batch_size: int = 256
    milestones: tuple[int, ...] = ()
    augment: bool = False
    bn_mode: str = "eval"
    optimizer: str = "adam"
    eps: float = 0.2
    pgd_steps: int = 5
    pgd_step_size: float = 0.2
    pgd_init: str = "max"
    adv_weight: float = 0.01
    share_weight: float = 1.0
    clean_weight: float = 1.0
    sar_weight: float = 1.0
    at_weight: float = 0.0

    def validate(self) -> "SAUConfig":
        super().validate()
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        check_pgd_options(self, "eps", "pgd_step_size", "pgd_steps", "pgd_init")
        weights = {"adv_weight": self.adv_weight, "share_weight": self.share_weight,
                   "clean_weight": self.clean_weight, "sar_weight": self.sar_weight, "at_weight": self.at_weight}
        bad = [k for k, v in weights.items() if not v >= 0]
        if bad:
            raise ConfigError(f"loss weights must be >= 0: {', '.join(f'{k}={weights[k]}' for k in bad)}")
        return self


def check_pgd_options(cfg: Any, eps: str, step_size: str, steps: str, init: str) -> None:
    """ConfigError unless the PGD settings of ``cfg`` (given by their field names) are valid: the
    L-inf bound in (0, 1], a positive step size, an integer number of steps >= 1, a known start."""
    e, s, n, i = (getattr(cfg, k) for k in (eps, step_size, steps, init))
    if not 0 < e <= 1 or not s > 0:
        raise ConfigError(f"{eps} must lie in (0, 1] and {step_size} be positive, got {eps}={e}, {step_size}={s}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{steps} must be an integer >= 1, got {n!r}")
    if i not in PGD_INITS:
        raise ConfigError(f"{init} must be one of {', '.join(PGD_INITS)}, got {i!r}")


class SharedAdversarial(NamedTuple):
    """What :func:`shared_adversarial_examples` finds for a batch."""
    x_adv: torch.Tensor       #: the perturbed images (detached, in [0, 1])
    ref_pred: torch.Tensor    #: the reference's predictions on ``x_adv``
    ref_fooled: torch.Tensor  #: the reference is fooled (neither ``y`` nor its clean prediction)
    shared: torch.Tensor      #: ``ref_fooled`` and the model predicts the reference's label


def fooled(pred_adv: torch.Tensor, pred_clean: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Adversarial success: the prediction on the perturbed image is neither the true label
    nor the prediction on the clean image."""
    return (pred_adv != y) & (pred_adv != pred_clean)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence between ``softmax(logits_a)`` and ``softmax(logits_b)``."""
    la, lb = F.log_softmax(logits_a, 1), F.log_softmax(logits_b, 1)
    lm = torch.logsumexp(torch.stack([la, lb]), 0) - torch.log(torch.tensor(2.0, device=la.device))
    return 0.5 * ((la.exp() * (la - lm)).sum(1) + (lb.exp() * (lb - lm)).sum(1))


def log_one_minus_prob(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-row ``log(1 - softmax(logits)[label])``, computed stably as
    ``logsumexp`` over the other classes minus ``logsumexp`` over all."""
    others = logits.scatter(1, label[:, None], float("-inf"))
    return torch.logsumexp(others, 1) - torch.logsumexp(logits, 1)


def shared_adversarial_examples(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                                eps: float = 0.2, steps: int = 5, step_size: float = 0.2, init: str = "max",
                                adv_weight: float = 0.01, share_weight: float = 1.0,
                                generator: torch.Generator | None = None) -> SharedAdversarial:
    """Per-sample L-inf PGD for shared adversarial examples of ``model`` and ``reference``.

    Ascends ``adv_weight * L_adv + share_weight * L_share`` (module docstring) by signed
    gradient steps, projecting onto ``|delta|_inf <= eps`` and ``x + delta`` in [0, 1]; stops
    early once every example is shared. Both models run in eval mode (their modes are restored)
    and no parameter gradient is touched.
    """
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            clean = model(x).argmax(1)
            clean_ref = reference(x).argmax(1)
        if init == "max":
            delta = torch.full_like(x, eps)
        elif init == "random":
            delta = (torch.rand(x.shape, generator=generator).to(x) * 2 - 1) * eps
        elif init == "zero":
            delta = torch.zeros_like(x)
        else:
            raise ConfigError(f"pgd init must be one of {', '.join(PGD_INITS)}, got {init!r}")
        delta = ((x + delta).clamp(0, 1) - x).detach()
        n = len(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            out, out_ref = model(x + delta), reference(x + delta)
            pred, pred_ref = out.argmax(1), out_ref.argmax(1)
            hit, hit_ref = fooled(pred, clean, y), fooled(pred_ref, clean_ref, y)
            shared = hit_ref & (pred == pred_ref)
            if bool(shared.all()):
                break
            adv = (F.cross_entropy(out, y, reduction="none")[~hit].sum()
                   + F.cross_entropy(out_ref, y, reduction="none")[~hit_ref].sum()) / (2 * n)
            share = -js_divergence(out, out_ref)[~shared].sum() / n
            (grad,) = torch.autograd.grad(adv_weight * adv + share_weight * share, [delta])
            with torch.no_grad():
                delta = delta + step_size * grad.sign()
                delta = (x + delta.clamp(-eps, eps)).clamp(0, 1) - x
        delta = delta.detach()
        with torch.no_grad():
            x_adv = x + delta
            pred, pred_ref = model(x_adv).argmax(1), reference(x_adv).argmax(1)
        hit_ref = fooled(pred_ref, clean_ref, y)
        return SharedAdversarial(x_adv, pred_ref, hit_ref, hit_ref & (pred == pred_ref))
    finally:
        model.train(modes[0])
        reference.train(modes[1])


def shared_adversarial_risk(logits_adv: torch.Tensor, sae: SharedAdversarial) -> torch.Tensor:
    """L_sar of the module docstring: over the examples that fool the reference, the mean (over the
    whole batch) of ``-log(1 - p(reference's adversarial label | x~))`` under ``logits_adv``."""
    mask = sae.ref_fooled
    return -log_one_minus_prob(logits_adv[mask], sae.ref_pred[mask]).sum() / len(logits_adv)


class SAU(BaselineDefense):
    """Shared Adversarial Unlearning (Wei et al., NeurIPS 2023).

    Each batch, PGD finds perturbations that make the model being purified and the frozen
    backdoored reference both misclassify, towards the same label (shared adversarial
    examples, which include what the trigger does). The update keeps clean accuracy and
    unlearns those examples: the purified model is penalised for agreeing with the
    reference's adversarial label, which breaks the backdoor shortcut it inherited.
    """

    name = "sau"
    config_class = SAUConfig
    tasks = ("image-classification",)
    task_reason = "its PGD keeps perturbed inputs in the [0, 1] pixel box and attacks class labels"

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: SAUConfig = self.config
        t_start = time.perf_counter()
        reference = copy.deepcopy(model).eval()  # the unchanged copy: the backdoored model
        for p in reference.parameters():
            p.requires_grad_(False)
        params = list(model.parameters())
        opt = make_optimizer(params, cfg, cfg.optimizer)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        counts: list[list[int]] = []  # per epoch: [examples, reference fooled, shared]
        pgd_s = [0.0]

        def sau_step(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            t0 = time.perf_counter()
            sae = shared_adversarial_examples(m, reference, x, y, eps=cfg.eps, steps=cfg.pgd_steps,
                                              step_size=cfg.pgd_step_size, init=cfg.pgd_init,
                                              adv_weight=cfg.adv_weight, share_weight=cfg.share_weight,
                                              generator=gen)
            pgd_s[0] += time.perf_counter() - t0
            counts[-1][0] += len(x)
            counts[-1][1] += int(sae.ref_fooled.sum())
            counts[-1][2] += int(sae.shared.sum())
            m.train(cfg.bn_mode == "train")  # the authors keep the whole model in eval mode
            logits, logits_adv = m(torch.cat([x, sae.x_adv])).split(len(x))
            terms = {"ce": self.task.mean_loss(logits, y)}
            terms["sar"] = shared_adversarial_risk(logits_adv, sae)
            if cfg.at_weight > 0:
                terms["at"] = F.cross_entropy(logits_adv, y)
            loss = (cfg.clean_weight * terms["ce"] + cfg.sar_weight * terms["sar"]
                    + cfg.at_weight * terms.get("at", 0.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            return terms

        def annotate(rec: dict[str, Any], *args: Any) -> None:
            n, ref_hit, shared = counts[-1]
            rec["ref_fooled_share"] = ref_hit / max(n, 1)
            rec["shared_share"] = shared / max(n, 1)
            if callback is not None:
                callback(rec, *args)
        annotate.needs_model = getattr(callback, "needs_model", False)  # type: ignore[attr-defined]

        setup_s = time.perf_counter() - t_start
        history = finetune(model, params, train_set, cfg, holdout=holdout, optimizer=opt, step_fn=sau_step,
                           epoch_start=lambda epoch: counts.append([0, 0, 0]), scheduler=self.scheduler(),
                           progress=progress, callback=annotate, desc=self.name, task=self.task)
        return Step(model.eval(), history, sum(p.numel() for p in params), {"setup": setup_s, "pgd": pgd_s[0]},
                    {"shared_share": [r["shared_share"] for r in history],
                     "ref_fooled_share": [r["ref_fooled_share"] for r in history]})


DEFENSES.register("sau", SAU, **SAU.paper_schedule())
