"""Backdoor detection from clean data alone: is this model (still) backdoored, toward which class?

``detect(model, clean_data, method="neural-cleanse", **options) -> DetectionReport``. Each
detector family reverse-engineers the smallest trigger per class and flags the class whose
trigger is anomalously small (median-absolute-deviation test, :mod:`.outlier`):

* ``neural-cleanse`` (:mod:`.neural_cleanse`, the default): mask + pattern, size = mask L1
  (Wang et al., S&P 2019); the suspected class's trigger is then refined toward the paper's
  smallest mask (the one reported, drawn and used for the proxy ASR);
* ``uap`` (:mod:`.uap`): targeted universal adversarial perturbation, size = its L2 norm (cheaper);
* ``point-cluster-size`` (:mod:`.point_cluster`): point clouds, the smallest cluster of points per
  class that sends half the other classes' clouds there, size = its number of points;
  ``point-cluster`` fixes the cluster's size and compares the loss it leaves (after Xiang et al.,
  ICASSP 2022; it flagged none of our point-cloud backdoors).

Clean data only: the clean set is split per class into an optimisation part and a held-out
part (``holdout`` = 20 %, at most ``max_holdout`` = 500 images); triggers toward class ``c``
are fitted on images of the other classes and the proxy ASR is the suspected trigger's flip
rate on held-out images of the other classes. Budgets are config options (``max_steps``,
``batch_size``, ...; see each family's config). With the defaults, on a width-16
PreActResNet18 and 10 CIFAR-10 classes, Neural Cleanse costs about 0.6x (typical) to 1.9x
(every class running to ``max_steps``) a 50-epoch fine-tuning on 500 images, UAP about 0.4x.

:mod:`.verify` compares a detector's findings before and after purification
(``fipurify purify --verify``); :mod:`.commands` is ``fipurify detect``.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from .base import ClassResult, Detector, DetectorConfig, flip_rate, replayed_flip_rate
from .outlier import DEFAULT_THRESHOLD, MAD_CONSTANT, anomaly_indices, class_count_threshold, most_anomalous
from .registry import DEFAULT_METHOD, DETECTORS, available, create, register
from .report import DetectionReport, Trigger
from . import neural_cleanse, point_cluster, uap  # noqa: E402,F401  (the families register themselves)
from .neural_cleanse import NeuralCleanse, NeuralCleanseConfig
from .uap import UAP, UAPConfig


def detect(model: nn.Module, clean_data: Dataset | DataLoader, method: str = DEFAULT_METHOD,
           log=None, **options: Any) -> DetectionReport:
    """Is ``model`` backdoored, and toward which class? Uses ``clean_data`` only.

    ``clean_data``: a map-style Dataset of ``(image, label)`` (images C x H x W in [0, 1]) or a
    DataLoader over one. ``options`` go to the method's config (e.g. ``max_steps``, ``seed``);
    ``log`` receives one line per class.
    """
    return create(method, **options).detect(model, clean_data, log=log)


__all__ = ["ClassResult", "DEFAULT_METHOD", "DEFAULT_THRESHOLD", "DETECTORS", "DetectionReport", "Detector",
           "DetectorConfig", "MAD_CONSTANT", "NeuralCleanse", "NeuralCleanseConfig", "Trigger", "UAP", "UAPConfig",
           "anomaly_indices", "available", "class_count_threshold", "create", "detect", "flip_rate", "most_anomalous", "register", "replayed_flip_rate"]
