"""Which device a command runs on: ``auto`` (a GPU when one is visible, else the CPU), ``cpu``,
``cuda``, ``cuda:N`` or ``mps``; checked before any compute."""
from __future__ import annotations

from .errors import ConfigError

CHOICES_HELP = "auto (a GPU when one is visible, else the CPU), cpu, cuda, cuda:N or mps"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is checked and kept."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device
