"""The one fine-tuning loop that every fine-tuning-based defense runs.

A defense supplies the trainable parameters and, optionally, a function adding
penalty terms to the task loss; the loop owns batching, augmentation, the
optimizer and schedule, divergence checks, progress and per-epoch logging.

The problem is a :class:`~fipurify.tasks.Task` (default image classification): the default
term is ``{"ce": task.loss(model, x, y)}`` (cross-entropy for classification), the
augmentation ``task.augment(x, generator, padding=4, flip=cfg.flip)`` and the per-epoch
hold-out figure ``task.score`` (logged as ``holdout_acc`` for accuracy, else
``holdout_<metric>``).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from ..errors import ConfigError, FipurifyError
from ..tasks import ImageClassification, Task
from .base import DefenseConfig, EpochCallback

#: extra(model, x, y, step) -> {name: scalar tensor}; the terms are added to the task loss
PenaltyFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]
#: objective(model, x, y, step) -> {name: scalar tensor}; replaces the default {"ce": task loss} terms
ObjectiveFn = PenaltyFn
#: step(model, x, y, step) -> {name: scalar tensor}: one whole update on a batch (its own forward passes,
#: backward and optimizer step, e.g. SAM's two passes); the returned terms are only checked and logged
StepFn = PenaltyFn


class PurificationDiverged(FipurifyError):
    """The loss became NaN or infinite; no purified model is returned."""


#: the task when none is given
_IMAGES = ImageClassification()


def set_bn_eval(model: nn.Module) -> None:
    """Put every batch-norm layer in eval mode (use and keep the running statistics)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def make_optimizer(params: Sequence[torch.Tensor], cfg: DefenseConfig, kind: str = "sgd",
                   nesterov: bool = False) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``: ``"sgd"`` (lr, momentum, weight decay; the loop's default) or
    ``"adam"`` (lr, weight decay)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=nesterov)
    raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {kind!r}")


def clean_loader(train_set: Dataset, cfg: DefenseConfig, generator: torch.Generator,
                 collate_fn: Callable | None = None) -> DataLoader:
    """Batches of one epoch: a shuffled pass over ``train_set``, or ``cfg.steps_per_epoch`` batches
    drawn with replacement when that is positive; ``collate_fn`` is the task's (None: stacking)."""
    batch = min(cfg.batch_size, len(train_set))
    if cfg.steps_per_epoch > 0:
        sampler = RandomSampler(train_set, replacement=True, num_samples=cfg.steps_per_epoch * batch,
                                generator=generator)
        return DataLoader(train_set, batch_size=batch, sampler=sampler, collate_fn=collate_fn)
    return DataLoader(train_set, batch_size=batch, shuffle=True, generator=generator, collate_fn=collate_fn)


def finetune(model: nn.Module, params: Sequence[torch.Tensor], train_set: Dataset, cfg: DefenseConfig, *,
             holdout: Dataset | None = None, penalty: PenaltyFn | None = None,
             optimizer: torch.optim.Optimizer | None = None, post_step: Callable[[float], None] | None = None,
             progress: bool = True,
             callback: EpochCallback | None = None, desc: str = "purify",
             objective: ObjectiveFn | None = None, epoch_start: Callable[[int], None] | None = None,
             stop: Callable[[dict[str, Any]], bool] | None = None, step_fn: StepFn | None = None,
             scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
             task: Task | None = None) -> list[dict[str, Any]]:
    """Minimise the task loss (+ ``penalty`` terms) over ``params`` for ``cfg.epochs`` epochs, in place.

    ``task`` (default image classification) gives the loss, the augmentation and the hold-out metric.
    ``post_step(lr)`` runs after every optimizer step (e.g. a proximal update).
    ``objective`` replaces the task-loss term (e.g. gradient ascent or a weighted loss);
    ``epoch_start(epoch)`` runs before each epoch (the loop then sets the train/BN mode);
    ``stop(record)`` runs after each epoch, before ``callback``; True ends training early.
    ``step_fn`` performs the whole update of a batch itself (the loop then neither backpropagates
    nor steps; pass its base optimizer as ``optimizer`` for the schedule and the logged lr).
    ``scheduler(optimizer)`` builds the per-epoch LR schedule (default: MultiStepLR on
    ``cfg.milestones`` and ``cfg.gamma``).
    Returns one record per epoch: mean of every loss term, the hold-out clean metric
    (accuracy for classification), learning rate and seconds.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise FipurifyError("nothing to train: no parameter requires a gradient")
    device = params[0].device
    task = task if task is not None else _IMAGES
    score_key = "holdout_acc" if task.metric == "accuracy" else f"holdout_{task.metric}"
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = clean_loader(train_set, cfg, gen, task.collate_fn)
    opt = optimizer or make_optimizer(params, cfg)
    sched = scheduler(opt) if scheduler is not None \
        else torch.optim.lr_scheduler.MultiStepLR(opt, [m for m in cfg.milestones], cfg.gamma)
    history: list[dict[str, Any]] = []
    step = 0
    bar = tqdm(total=cfg.epochs * len(loader), desc=desc, disable=not progress, unit="it", leave=False)
    try:
        for epoch in range(1, cfg.epochs + 1):
            if epoch_start is not None:
                epoch_start(epoch)
            model.train()
            if cfg.bn_mode == "eval":
                set_bn_eval(model)
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                if cfg.augment:
                    x = task.augment(x, gen, padding=4, flip=cfg.flip)
                if step_fn is not None:
                    terms = {k: v.detach() for k, v in step_fn(model, x, y, step).items()}
                else:
                    terms = objective(model, x, y, step) if objective is not None \
                        else {"ce": task.loss(model, x, y)}
                    if penalty is not None:
                        terms.update(penalty(model, x, y, step))
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise PurificationDiverged(
                        f"the loss became {loss.item()} at epoch {epoch} (terms: "
                        + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                        + "); lower lr or the penalty weights")
                if step_fn is None:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                if post_step is not None:
                    post_step(opt.param_groups[0]["lr"])
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                    counts[k] = counts.get(k, 0) + 1
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, **{k: f"{v.item():.3g}" for k, v in terms.items()})
            sched.step()
            rec: dict[str, Any] = {"epoch": epoch, **{k: sums[k] / counts[k] for k in sums},
                                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            if holdout is not None and len(holdout):
                rec[score_key] = task.score(model, holdout)
            history.append(rec)
            done = stop is not None and stop(rec)
            if callback is not None:  # a callback with needs_model (e.g. a smoothness tracker) gets the model too
                callback(rec, model) if getattr(callback, "needs_model", False) else callback(rec)
            if done:
                break
    finally:
        bar.close()
    model.eval()
    return history
