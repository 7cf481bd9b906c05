"""Clean accuracy (ACC), attack success rate (ASR), label-correction rate (LCR) and DER.

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


def defense_effectiveness_rate(before: dict[str, float], after: dict[str, float]) -> float:
    """DER = [max(0, ASR drop) - max(0, ACC drop) + 1] / 2, in [0, 1] (higher is better)."""
    d_asr = before["asr"] - after["asr"]
    d_acc = before["acc"] - after["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table; rates (acc, asr, lcr, der, *_acc) are shown as percentages."""
    rate_cols = {"acc", "asr", "lcr", "der"}
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
