"""Backdoor purification methods behind one interface: ``create(name, ...).purify(model, clean_data)``."""
from .base import Defense, DefenseConfig, as_dataset, check_clean_set
from .fip import FIP, FIPConfig
from .loop import PurificationDiverged, finetune
from .registry import METHODS, PAPER_PRESETS, available, create, preset

__all__ = ["Defense", "DefenseConfig", "FIP", "FIPConfig", "METHODS", "PAPER_PRESETS", "PurificationDiverged",
           "as_dataset", "available", "check_clean_set", "create", "finetune", "preset", "purify"]


def purify(model, clean_data, method: str = "ffip", dataset: str | None = None, progress: bool = True, **options):
    """Purify ``model`` with ``method`` on ``clean_data``; returns the purified copy."""
    return create(method, dataset, **options).purify(model, clean_data, progress=progress)
