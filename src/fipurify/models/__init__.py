"""The model zoo: small-image CNNs and a ViT, all taking [0, 1] images with normalisation inside.

Use :func:`create` to build one by name; every model exposes ``model.classifier``
(the final ``nn.Linear``) and ``model.features(x)`` (its input, the penultimate features).
"""
from ..registry import discover
from .normalize import DATASET_STATS, Normalize, dataset_stats, generic_stats
from .preact_resnet import PreActResNet18
from .registry import MODELS, available, canonical_name, create
from .resnet import ResNet18
from .vgg import VGG
from .vit import ViT
from .wideresnet import WideResNet

discover(__name__)  # any other model module registers itself too

__all__ = [
    "DATASET_STATS", "MODELS", "Normalize", "PreActResNet18", "ResNet18", "VGG", "ViT", "WideResNet",
    "available", "canonical_name", "create", "dataset_stats", "generic_stats",
]
