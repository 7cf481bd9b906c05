"""Named purification methods and their per-dataset presets."""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Defense
from .fip import FIP
from .released import RELEASED_OBJECTIVE, RELEASED_REGIME
from .awm import AWM
from .ibau import IBAU
from .rnp import RNP
from .anp import ANP
from .clp import CLP
from .fineprune import FinePruning
from .ftsam import FTSAM
from .mcr import MCR
from .nad import NAD
from .sau import SAU
from .fst import FST
from .bti_dbf import BTIDBF
from .nft import NFT

# The paper's per-dataset FIP settings (appendix A.3.2): clean-set share, epochs, schedule.
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"epochs": 50, "lr": 0.01, "milestones": (40,), "gamma": 0.1, "clean_fraction": 0.01},
    "gtsrb": {"epochs": 50, "lr": 0.01, "milestones": (40,), "gamma": 0.1, "clean_fraction": 0.03},
    "tiny-imagenet": {"epochs": 15, "lr": 0.01, "milestones": tuple(range(1, 15)), "gamma": 0.3,
                      "clean_fraction": 0.05},
    "imagenet": {"epochs": 2, "lr": 0.001, "milestones": (1,), "gamma": 0.995, "clean_fraction": 0.03},
}

# method name -> (class, option overrides). Ablations are configurations, not forks.
METHODS: dict[str, tuple[type[Defense], dict[str, Any]]] = {
    "ffip": (FIP, {"space": "spectral"}),
    "fip": (FIP, {"space": "weights"}),
    "ffip-no-trf": (FIP, {"space": "spectral", "eta_f": 0.0}),
    "ffip-no-lr": (FIP, {"space": "spectral", "eta_r": 0.0}),
    "ft": (FIP, {"space": "weights", "eta_f": 0.0, "eta_r": 0.0}),
    # the authors' released script: its noise term in its regime (fipurify.defenses.released)
    "fip-released": (FIP, {**RELEASED_OBJECTIVE, **RELEASED_REGIME}),
    "i-bau": (IBAU, IBAU.paper_schedule()),
    "awm": (AWM, AWM.paper_schedule()),
    "rnp": (RNP, RNP.paper_schedule()),
    # baselines keep their own papers' schedules (a dataset preset holds FIP's)
    "ft-sam": (FTSAM, FTSAM.paper_schedule()),
    "fp": (FinePruning, FinePruning.paper_schedule()),
    "nad": (NAD, NAD.paper_schedule()),
    "mcr": (MCR, MCR.paper_schedule()),
    "clp": (CLP, CLP.paper_schedule()),
    "anp": (ANP, ANP.paper_schedule()),
    "sau": (SAU, SAU.paper_schedule()),
    "fst": (FST, FST.paper_schedule()),
    "bti-dbf": (BTIDBF, BTIDBF.paper_schedule()),
    # BTI-DBF(U) with path-aware minimisation, in the PAM authors' unlearning setting (bti_dbf.py)
    "bti-dbf-pam": (BTIDBF, {**BTIDBF.paper_schedule(), "pam": True, "pam_rho": 0.5, "optimizer": "sgd", "lr": 0.01,
                             "momentum": 0.1, "poison_share": 0.2, "feature_weight": 0.0, "rounds": 3}),
    "nft": (NFT, NFT.paper_schedule()),
    # FT-SAM as BackdoorBench runs it (defense/ft-sam.py, config/defense/ft-sam/cifar10.yaml, with 5% clean data
    # there); "ft-sam" is the FIP paper's A.3.3 setting
    "ft-sam-bb": (FTSAM, {**FTSAM.paper_schedule(), "epochs": 100, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                          "batch_size": 256, "schedule": "cosine", "milestones": (), "rho": 2.0, "adaptive": True,
                          "label_smoothing": 0.1, "augment": True, "flip": True}),
}


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(METHODS)


def preset(dataset: str) -> dict[str, Any]:
    """The paper's schedule for ``dataset`` (a copy), including its clean-set share."""
    key = dataset.lower().replace("_", "-")
    if key not in PAPER_PRESETS:
        raise ConfigError(f"no preset for dataset {dataset!r}; known: {', '.join(PAPER_PRESETS)}")
    return dict(PAPER_PRESETS[key])


def create(method: str = "ffip", dataset: str | None = None, **options: Any) -> Defense:
    """A configured defense: the dataset's FIP schedule (FIP family only), method defaults, then ``options``.

    ``dataset`` is validated for every method.
    """
    key = method.lower()
    if key not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(available())}")
    cls, fixed = METHODS[key]
    merged: dict[str, Any] = {}
    if dataset is not None:
        schedule = {k: v for k, v in preset(dataset).items() if k != "clean_fraction"}
        if cls is FIP:  # the presets are FIP's; baselines keep their own papers' schedules
            merged.update(schedule)
    merged.update(fixed)
    merged.update(options)
    return cls(cls.config_class(), **merged)
