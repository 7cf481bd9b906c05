import numpy as np
import pytest
import torch
from torch import nn

from fipurify.datasets.base import ArrayDataset
from fipurify.errors import DataError
from fipurify.metrics import accuracy, defense_effectiveness_rate, evaluate


class FixedPredictor(nn.Module):
    """Predicts the class written in the first pixel (value * 255)."""

    def __init__(self, n_classes):
        super().__init__()
        self.n = n_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 255).round().long()
        return torch.nn.functional.one_hot(cls, self.n).float() + 0 * self.dummy


def _ds(pred_classes, labels, n=4):
    imgs = np.zeros((len(labels), 2, 2, 1), np.uint8)
    imgs[:, 0, 0, 0] = pred_classes
    return ArrayDataset(imgs, labels, [str(i) for i in range(n)])


class _Backdoor(ArrayDataset):
    pass


def test_acc_asr_lcr_on_hand_made_predictions():
    model = FixedPredictor(4)
    clean = _ds([0, 1, 2, 3, 0], [0, 1, 2, 2, 1])           # 3 of 5 right
    bd = _Backdoor(_ds([0, 0, 2, 3], [0, 0, 0, 0]).images, [0, 0, 0, 0], [str(i) for i in range(4)])
    bd.true_labels = np.array([1, 2, 2, 3])                  # predictions 0,0,2,3
    r = evaluate(model, clean, bd)
    assert r["acc"] == pytest.approx(0.6)
    assert r["asr"] == pytest.approx(0.5)    # two predicted as target 0
    assert r["lcr"] == pytest.approx(0.5)    # 2 and 3 are their true classes
    assert r["n_backdoor"] == 4


def test_class_count_mismatch_and_empty():
    with pytest.raises(DataError, match="class count mismatch"):
        evaluate(FixedPredictor(3), _ds([0], [0], n=4))
    with pytest.raises(DataError, match="empty"):
        evaluate(FixedPredictor(4), _ds([0], [0]).subset([]))


def test_der():
    assert defense_effectiveness_rate({"acc": 0.9, "asr": 1.0}, {"acc": 0.88, "asr": 0.02}) == pytest.approx(
        (0.98 - 0.02 + 1) / 2)
    # ACC going up and ASR going up are clipped at zero
    assert defense_effectiveness_rate({"acc": 0.8, "asr": 0.1}, {"acc": 0.9, "asr": 0.5}) == pytest.approx(0.5)
    assert accuracy(np.array([1, 2]), np.array([1, 3])) == 0.5
