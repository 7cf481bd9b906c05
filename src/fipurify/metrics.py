"""Clean accuracy (ACC), attack success rate (ASR), label-correction rate (LCR) and DER.

:func:`evaluate` measures a classifier; :func:`evaluate_task` any task's metrics (mAP,
BLEU) in the same result format.

All rates are fractions in [0, 1]. ASR and LCR are measured on a backdoor test set:
triggered test images whose true class is not the attack's target (all-to-one), each
labelled with the attack's target; it must expose ``true_labels`` for LCR.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import DataError


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and dataset labels, in dataset order, with the model in eval mode."""
    if len(dataset) == 0:
        raise DataError("cannot evaluate on an empty dataset")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    preds, labels = [], []
    try:
        for i, (x, y) in enumerate(DataLoader(dataset, batch_size=batch_size, shuffle=False)):
            out = model(x.to(device))
            if i == 0:
                _check_classes(out.shape[1], dataset)
            preds.append(out.argmax(1).cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def _check_classes(n_out: int, dataset: Dataset) -> None:
    n_data = getattr(dataset, "num_classes", None)
    if n_data is not None and n_data != n_out:
        raise DataError(f"class count mismatch: the model predicts {n_out} classes but the dataset has {n_data}")


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Share of predictions equal to the labels."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels))) if len(preds) else float("nan")


def evaluate(model: nn.Module, clean_test: Dataset, backdoor_test: Dataset | None = None,
             batch_size: int = 256) -> dict[str, Any]:
    """ACC on ``clean_test``; ASR and LCR on ``backdoor_test`` (when given).

    Returns ``{"acc", "asr", "lcr", "n_clean", "n_backdoor"}``; ``asr``/``lcr`` are None
    without a backdoor test set.
    """
    preds, labels = predict(model, clean_test, batch_size)
    result: dict[str, Any] = {"acc": accuracy(preds, labels), "asr": None, "lcr": None,
                              "n_clean": int(len(labels)), "n_backdoor": 0}
    if backdoor_test is not None:
        bpreds, targets = predict(model, backdoor_test, batch_size)
        true = getattr(backdoor_test, "true_labels", None)
        if true is None:
            raise DataError("the backdoor test set has no true_labels; build it with attack.backdoor_test_set()")
        result.update(asr=accuracy(bpreds, targets), lcr=accuracy(bpreds, np.asarray(true)),
                      n_backdoor=int(len(targets)))
    return result


def evaluate_task(model: nn.Module, clean_test: Dataset, backdoor_test: Dataset | None = None,
                  task: Any = None, batch_size: int = 256) -> dict[str, Any]:
    """The metrics of ``model`` for its task (``task``, else the clean test set's own).

    Every result has ``acc`` (the task's clean metric), ``asr``, ``lcr``, ``n_clean`` and
    ``n_backdoor``, so DER and the result tables apply to every task; other tasks add
    ``metric`` (the name of ``acc``) and their own names:

    * single-label classification (images, point clouds, video clips): exactly :func:`evaluate`
      (accuracy, ASR, LCR; no ``metric`` key, the format classifiers always had);
    * multi-label classification: ``mAP`` (= ``acc``) on the clean test set, and the
      backdoor test set's ``attack_success_rate`` (thresholded outputs showing the attacker's
      outcome on the attacked classes) as ``asr``; no LCR;
    * translation: ``CT`` (BLEU/100 on the clean test set, = ``acc``), ``AT`` (BLEU/100 of the
      triggered sources against the attacker's sentence) and ``ASR`` (share of triggered
      translations containing it, = ``asr``); see
      :func:`fipurify.tasks.translation.backdoor_metrics`.
    """
    from .tasks import Classification, task_of

    task = task if task is not None else task_of(clean_test)
    if isinstance(task, Classification):
        return evaluate(model, clean_test, backdoor_test, batch_size)
    result: dict[str, Any] = {"acc": None, "asr": None, "lcr": None, "n_clean": int(len(clean_test)),
                              "n_backdoor": 0 if backdoor_test is None else int(len(backdoor_test)),
                              "metric": task.metric}
    if task.name == "translation":
        from .tasks.translation import backdoor_metrics
        m = backdoor_metrics(model, clean_test, backdoor_test, batch_size, task=task)
        result.update(m, acc=m["CT"], asr=m.get("ASR"))
        return result
    result["acc"] = result[task.metric] = task.score(model, clean_test, batch_size)
    if backdoor_test is not None:
        rate = getattr(backdoor_test, "attack_success_rate", None)
        if rate is None:
            raise DataError(f"the {task.name} backdoor test set has no attack_success_rate(model); build it "
                            "with attack.backdoor_test_set()")
        result["asr"] = float(rate(model, batch_size=batch_size))
    return result


def defense_effectiveness_rate(before: dict[str, float], after: dict[str, float]) -> float:
    """DER = [max(0, ASR drop) - max(0, ACC drop) + 1] / 2, in [0, 1] (higher is better)."""
    d_asr = before["asr"] - after["asr"]
    d_acc = before["acc"] - after["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table; rates (acc, asr, lcr, der, mAP, CT, AT, ASR, *_acc) are shown as percentages."""
    rate_cols = {"acc", "asr", "lcr", "der", "mAP", "CT", "AT", "ASR"}
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if v is None:
                cells.append("-")
            elif (c in rate_cols or c.endswith("_acc")) and isinstance(v, float):
                cells.append(f"{100 * v:.2f}")
            elif isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
