"""Backdoor purification methods behind one interface: ``create(name, ...).purify(model, clean_data)``.

Each method module registers itself in :data:`DEFENSES` (training-time ones in
:data:`TRAINING_DEFENSES`); a new defense is one new module here.
"""
from .base import DEFENSES, Defense, DefenseConfig, as_dataset, check_clean_set
from .fip import FIP, FIPConfig
from .anp import ANP, ANPConfig
from .clp import CLP, CLPConfig
from .fineprune import FinePruning, FinePruningConfig
from .ftsam import FTSAM, FTSAMConfig
from .mcr import MCR, MCRConfig
from .nad import NAD, NADConfig
from .sau import SAU, SAUConfig
from .fst import FST, FSTConfig
from .bti_dbf import BTIDBF, BTIDBFConfig
from .nft import NFT, NFTConfig
from .awm import AWM, AWMConfig
from .ibau import IBAU, IBAUConfig
from .rnp import RNP, RNPConfig
from .loop import PurificationDiverged, finetune
from .registry import DEFAULT_METHODS, METHODS, PAPER_PRESETS, available, create, default_method, preset
from .training_time import (TRAINING_DEFENSES, TrainingDefense, TrainingDefenseConfig, available_training_defenses,
                            create_training_defense)

__all__ = ["DEFENSES", "TRAINING_DEFENSES", "AWM", "AWMConfig", "IBAU", "IBAUConfig", "RNP", "RNPConfig", "TrainingDefense",
           "TrainingDefenseConfig", "available_training_defenses", "create_training_defense",
           "ANP", "ANPConfig", "CLP", "CLPConfig", "FTSAM", "FTSAMConfig", "FinePruning", "FinePruningConfig",
           "MCR", "MCRConfig", "NAD", "NADConfig",
           "SAU", "SAUConfig", "FST", "FSTConfig",
           "BTIDBF", "BTIDBFConfig", "NFT", "NFTConfig",
           "Defense", "DefenseConfig", "FIP", "FIPConfig", "METHODS", "PAPER_PRESETS", "PurificationDiverged",
           "DEFAULT_METHODS", "as_dataset", "available", "check_clean_set", "create", "default_method", "finetune",
           "preset", "purify"]


def purify(model, clean_data, method: str | None = None, dataset: str | None = None, progress: bool = True,
           **options):
    """Purify ``model`` with ``method`` on ``clean_data``; returns the purified copy. ``method`` None is the
    default for the clean data's task (:func:`~fipurify.defenses.registry.default_method`)."""
    if method is None:
        from ..tasks import task_of
        method = default_method(task_of(clean_data))
    return create(method, dataset, **options).purify(model, clean_data, progress=progress)
