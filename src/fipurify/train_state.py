"""A training run's resumable state: one file written after every epoch, read back to continue.

Long trainings (the paper's 100 - 250 epochs take many CPU-hours) outlive a session or a
lent machine. :func:`fipurify.training.train_model` with ``checkpoint=PATH`` writes this file
after each epoch and, when it finds one, continues from the epoch after the last one written,
so that a resumed run gives the same weights as an uninterrupted one (same batches, same
augmentation, same learning rate at each step; bit for bit on the CPU).

What the file holds (``torch.save`` of plain containers, read back with ``weights_only=True``:
nothing in it is unpickled as code): the format tag, the training configuration and the
number of batches per epoch (a file written for another run is refused with a one-line
error), the epoch and step reached, the model's, the optimizer's and the scheduler's state
dicts, the states of the run's random generators (batches + augmentation, the smoothness
penalty's, and torch's global ones, which dropout draws from), and the per-epoch history so
far. Writes are atomic (a killed run leaves the previous epoch's file, never half a file).
Beside a model file ``M`` the state lives in ``M.train-state.pt`` (:func:`beside`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelFileError
from .io import atomic_output

FORMAT = "fipurify-train-state/1"


def beside(model_path: str | os.PathLike) -> Path:
    """Where the training of the model saved at ``model_path`` keeps its state (``<model_path>.train-state.pt``)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".train-state.pt")


def save(path: str | os.PathLike, *, config: dict[str, Any], batches_per_epoch: int, epoch: int, step: int,
         model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         generators: dict[str, torch.Generator], history: list[dict[str, Any]]) -> Path:
    """Write the state after ``epoch`` (atomically) to ``path``."""
    state = {"format": FORMAT, "config": dict(config), "batches_per_epoch": int(batches_per_epoch),
             "epoch": int(epoch), "step": int(step),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generators": {k: g.get_state() for k, g in generators.items()},
             "global_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "history": [{k: _plain(v) for k, v in rec.items()} for rec in history]}
    with atomic_output(path) as f:
        torch.save(state, f)
    return Path(path)


def _plain(v: Any) -> Any:
    """A history value as a plain Python object (a numpy or torch scalar would not load under weights_only)."""
    if v is None or type(v) in (bool, int, float, str):  # exact types: numpy.float64 subclasses float
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def load(path: str | os.PathLike, *, config: dict[str, Any], batches_per_epoch: int) -> dict[str, Any] | None:
    """The state stored at ``path``, or None when there is no file.

    Refused (:class:`~fipurify.errors.ConfigError`) when it was written for another training
    configuration or another number of batches per epoch (a different training set), and
    (:class:`~fipurify.errors.ModelFileError`) when it is not a training state at all.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = _read(path)
    if state["config"] != dict(config) or state["batches_per_epoch"] != batches_per_epoch:
        changed = sorted(k for k in set(state["config"]) | set(config) if state["config"].get(k) != config.get(k))
        what = ", ".join(changed) if changed else \
            f"batches per epoch {state['batches_per_epoch']} != {batches_per_epoch} (another training set)"
        raise ConfigError(f"the training state {path} belongs to another run ({what}); "
                          f"delete it or give another checkpoint path")
    return state


def _read(path: Path) -> dict[str, Any]:
    """The training state in the file ``path`` (weights_only); ModelFileError if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ModelFileError(f"{path} is not a readable fipurify training state ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a fipurify training state (format {FORMAT})")
    return state


def epochs_done(path: str | os.PathLike) -> int:
    """How many epochs the state at ``path`` holds (0 when there is no file or it is unreadable)."""
    path = Path(path)
    if not path.exists():
        return 0
    try:
        return int(_read(path)["epoch"])
    except ModelFileError:
        return 0


def restore(state: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            generators: dict[str, torch.Generator]) -> None:
    """Put ``state``'s model, optimizer, scheduler and generator states back in place."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["mismatch"])[0]
        raise ConfigError(f"the training state does not fit this model: {first}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    torch.set_rng_state(state["global_rng"])
    if state["cuda_rng"] and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
