"""Shared benchmark presets: the CPU-feasible CIFAR-10 setting every benchmark reuses.

CPU preset (documented in README): PreActResNet18 at width 16 (0.7 M parameters), 45,000
training images (10% = 5,000 held out as clean reserve, seed 0), 10 epochs of SGD
(momentum 0.9, Nesterov, weight decay 5e-4, batch 128) with a one-cycle schedule peaking at
lr 0.1, random crop (pad 4) + horizontal flip. Attacks: target class 0, 10% of eligible
images poisoned (SIG: 80% of the target class, clean-label).
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "cache" / "models"
RESULTS = ROOT / "results"

CPU_PRESET = {"dataset": "cifar10", "arch": "preactresnet18", "width": 16, "epochs": 10, "lr": 0.1,
              "schedule": "onecycle", "batch_size": 128, "weight_decay": 5e-4, "reserve": 5000, "seed": 0}

ATTACKS = {
    "badnets": {"poison_rate": 0.1},
    "blend": {"poison_rate": 0.1},
    "trojan": {"poison_rate": 0.1},
    "sig": {"poison_rate": 0.8},
}


def model_path(attack: str, preset: dict = CPU_PRESET) -> Path:
    """Where the backdoored model of ``attack`` at ``preset`` is cached."""
    return CACHE / f"{preset['dataset']}_{attack}_{preset['arch']}-w{preset['width']}_e{preset['epochs']}_s{preset['seed']}.safetensors"
