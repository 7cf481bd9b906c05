"""Training a clean or backdoored classifier from scratch (the attacker's side).

SGD with momentum and weight decay, random crop + flip augmentation applied per batch,
a learning-rate schedule, a seed, a progress bar and per-epoch ACC / ASR.

The loss, the forward pass and the augmentation are those of the training set's
:class:`~fipurify.tasks.Task` (``task=``, else ``task_of(train_set)``: image classification,
cross-entropy, crop with ``padding`` and ``flip``); a task that is not classification gets its
own metric (``task.score``) on ``clean_test`` instead of ACC / ASR, and no train accuracy.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import train_state
from .curvature.fisher import fisher_trace
from .errors import ConfigError, DataError
from .tasks import Classification, Task, task_of
from .validation import check_optimisation
from .metrics import evaluate

SCHEDULES = ("onecycle", "cosine", "step", "constant")
#: Batches timed before the duration of the whole run is estimated.
ESTIMATE_AFTER = 5


def format_duration(seconds: float) -> str:
    """``3 h 40 min``, ``12 min``, ``40 s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def duration_estimate(elapsed: float, done: int, total: int, epochs: int) -> str:
    """One line: how long ``total`` batches take at the speed of the first ``done`` (evaluation not included)."""
    return (f"about {format_duration(elapsed / done * total)} for {epochs} epoch{'s' if epochs > 1 else ''} "
            f"at this speed ({elapsed / done:.2f} s per batch; evaluation not included)")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_model`.

    Schedules: ``onecycle`` (linear warm-up over the first 15% of steps to ``lr``, then
    cosine annealing to ~0; fast convergence, the CPU preset), ``cosine`` (cosine from
    ``lr``), ``step`` (x ``gamma`` every ``step_epochs``; the paper's 0.01, x0.1 / 100
    epochs over 250 epochs), ``constant``.
    """
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "onecycle"
    step_epochs: int = 100
    gamma: float = 0.1
    augment: bool = True
    flip: bool = True
    padding: int = 4
    seed: int = 0
    eval_every: int = 1
    #: Adaptive attack (FIP paper eq. 5 / Table 14): weight eta_F of a Fisher-trace penalty
    #: added to the loss, so the backdoored model settles in a flatter minimum; 0 = off.
    smoothness_penalty: float = 0.0
    #: Add the penalty every this many steps (it costs a double backward pass).
    smoothness_interval: int = 1

    def validate(self) -> "TrainConfig":
        check_optimisation(self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not float(self.smoothness_penalty) >= 0:
            raise ConfigError(f"smoothness_penalty must be >= 0, got {self.smoothness_penalty}")
        if isinstance(self.smoothness_interval, bool) or not isinstance(self.smoothness_interval, int) \
                or self.smoothness_interval < 1:
            raise ConfigError(f"smoothness_interval must be an integer >= 1, got {self.smoothness_interval!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """The per-iteration learning-rate scheduler for ``cfg.schedule``."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=0.15, anneal_strategy="cos")
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_epochs * steps_per_epoch,
                                               gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _smoothness_term(model: nn.Module, logits: torch.Tensor, cfg: TrainConfig, step: int,
                     generator: torch.Generator, loss: torch.Tensor, task: Task | None = None) -> torch.Tensor:
    """``loss + eta_F * Tr(F)`` on the penalty steps, else ``loss`` (the adaptive attack's objective).

    Tr(F) is :func:`fipurify.curvature.fisher.fisher_trace`'s "sampled" estimate on this
    batch's logits (labels drawn from the model, BatchNorm as in training).
    """
    if cfg.smoothness_penalty <= 0 or step % cfg.smoothness_interval:
        return loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss + cfg.smoothness_penalty * fisher_trace(model, None, params, "sampled", logits=logits,
                                                        generator=generator, task=task)


def train_model(model: nn.Module, train_set: Dataset, config: TrainConfig | None = None, *,
                clean_test: Dataset | None = None, backdoor_test: Dataset | None = None,
                progress: bool = True, log: Callable[[str], None] | None = print,
                callback: Callable[..., None] | None = None, task: Task | None = None,
                checkpoint: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place on ``train_set``; returns one record per epoch.

    ``checkpoint`` (a file path) makes the run resumable (:mod:`fipurify.train_state`): the
    state is written there after every epoch, and a run that finds the file continues after
    the last epoch it holds, with the same result as an uninterrupted run (a file written for
    another configuration or training set is refused). The file is kept when training ends,
    so a rerun returns at once with the stored history; delete it once the model is saved.
    Callbacks see only the epochs run in this call.

    ``task`` is the problem (default ``task_of(train_set)``, image classification).

    ``callback(record)`` runs after each epoch (``callback(record, model)`` when
    ``callback.needs_model`` is true, e.g. a smoothness tracker).

    When ``clean_test`` (and ``backdoor_test``) are given, ACC (and ASR) are measured
    every ``eval_every`` epochs and at the end; they never influence training.
    """
    cfg = (config or TrainConfig()).validate()
    if len(train_set) == 0:
        raise DataError("the training set is empty")
    task = task if task is not None else task_of(train_set)
    classification = isinstance(task, Classification)
    n_data = getattr(train_set, "num_classes", None) if classification else None
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=False,
                        collate_fn=task.collate_fn)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    sched = make_scheduler(opt, cfg, len(loader))
    history: list[dict[str, Any]] = []
    step, fisher_gen = 0, torch.Generator().manual_seed(cfg.seed + 104729)  # own stream: same batches with or without
    generators = {"data": gen, "fisher": fisher_gen}
    start = 1
    state = train_state.load(checkpoint, config=cfg.to_dict(), batches_per_epoch=len(loader)) \
        if checkpoint is not None else None
    if state is not None:
        train_state.restore(state, model=model, optimizer=opt, scheduler=sched, generators=generators)
        history, step, start = list(state["history"]), int(state["step"]), int(state["epoch"]) + 1
    if log:
        log(f"{sum(p.numel() for p in model.parameters()):,} parameters; {cfg.epochs} "
            f"epoch{'s' if cfg.epochs > 1 else ''} of {len(loader)} batches"
            + (f"; resuming after epoch {start - 1} from {checkpoint}" if state is not None else ""))
    t_run, step_run = time.perf_counter(), step
    for epoch in range(start, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False, unit="batch")
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if cfg.augment:
                x = task.augment(x, gen, padding=cfg.padding, flip=cfg.flip)
            out = task.forward(model, x, y)
            if n_data is not None and out.shape[1] != n_data:
                raise DataError(f"class count mismatch: the model predicts {out.shape[1]} classes "
                                f"but the dataset has {n_data}")
            loss = task.mean_loss(out, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}; lower the lr")
            opt.zero_grad(set_to_none=True)
            _smoothness_term(model, out, cfg, step, fisher_gen, loss, task).backward()
            step += 1
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            if classification:
                correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
            if step - step_run == ESTIMATE_AFTER and log and cfg.epochs * len(loader) - step_run > ESTIMATE_AFTER:
                log(duration_estimate(time.perf_counter() - t_run, ESTIMATE_AFTER,
                                      cfg.epochs * len(loader) - step_run, cfg.epochs - start + 1))
        rec: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / seen,
                               **({"train_acc": correct / seen} if classification else {}),
                               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if clean_test is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            if classification:
                rec.update({k: v for k, v in evaluate(model, clean_test, backdoor_test).items()
                            if k in ("acc", "asr", "lcr")})
            else:
                rec[task.metric] = task.score(model, clean_test)
        history.append(rec)
        if checkpoint is not None:
            train_state.save(checkpoint, config=cfg.to_dict(), batches_per_epoch=len(loader), epoch=epoch,
                             step=step, model=model, optimizer=opt, scheduler=sched, generators=generators,
                             history=history)
        if callback is not None:
            callback(rec, model) if getattr(callback, "needs_model", False) else callback(rec)
        if log:
            msg = f"epoch {epoch:3d}  loss {rec['loss']:.4f}"
            if "train_acc" in rec:
                msg += f"  train-acc {100 * rec['train_acc']:.2f}"
            if "acc" in rec:
                msg += f"  ACC {100 * rec['acc']:.2f}"
            if rec.get("asr") is not None:
                msg += f"  ASR {100 * rec['asr']:.2f}"
            log(msg + f"  ({rec['seconds']:.1f}s)")
    model.eval()
    return history
