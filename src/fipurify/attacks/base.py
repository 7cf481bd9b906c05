"""Attack base class and the two datasets an attack produces.

An :class:`Attack` poisons a training set (:class:`PoisonedDataset`: a chosen share of the
eligible samples carry the trigger and, unless the attack is clean-label, the target
label) and builds the backdoor test set (:class:`BackdoorTestSet`: triggered test images
labelled with the attack target, plus their true labels). Evaluation code computes
``ASR = mean(pred == test_set.targets)`` and ``LCR = mean(pred == test_set.true_labels)``.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..registry import Registry
from .triggers import Trigger, trigger_from_spec

MODES = ("all2one", "all2all")


# --------------------------------------------------------------------------- dataset helpers
def dataset_labels(dataset: Any) -> np.ndarray:
    """All labels of a map-style dataset as int64; uses ``dataset.labels`` when present."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape == (len(dataset),):
            return labels
    # General map-style dataset: read every item (loads the images too).
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def dataset_num_classes(dataset: Any, fallback: int | None = None) -> int:
    """``dataset.num_classes``, else ``len(dataset.classes)``, else ``fallback``."""
    n = getattr(dataset, "num_classes", None)
    if n is None and getattr(dataset, "classes", None) is not None:
        n = len(dataset.classes)
    if n is None:
        n = fallback
    if n is None:
        raise DataError("the dataset must expose num_classes (or classes), or pass num_classes to the attack")
    return int(n)


def _stack_images(dataset: Any, indices: np.ndarray, trigger: Trigger | None, flags: np.ndarray,
                  chunk: int = 1024) -> torch.Tensor:
    """Images ``dataset[indices]`` as one N x C x H x W float tensor, triggered where ``flags``.

    ``trigger`` may be ``None`` when no flag is set (see :func:`stack_clean`).

    Fast path for ArrayDataset-like inputs (uint8 N x H x W x C ``images``): converted and
    triggered in chunks with the same element-wise operations as per-item access, so the
    result equals stacking ``dataset[i]`` item by item.
    """
    images = getattr(dataset, "images", None)
    fast = isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 \
        and len(images) == len(dataset)
    parts = []
    for start in range(0, len(indices), chunk):
        idx = indices[start:start + chunk]
        if fast:
            x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div_(255.0)
        else:
            x = torch.stack([dataset[int(i)][0] for i in idx])
        f = torch.from_numpy(flags[start:start + chunk])
        if f.any():
            x[f] = trigger.apply(x[f])
        parts.append(x)
    if not parts:
        raise DataError("no images to stack: the dataset is empty")
    return torch.cat(parts)


def stack_clean(dataset: Any, indices: np.ndarray) -> torch.Tensor:
    """Clean images ``dataset[indices]`` as one N x C x H x W float tensor (equal to item access)."""
    indices = np.asarray(indices, dtype=np.int64)
    return _stack_images(dataset, indices, None, np.zeros(len(indices), dtype=bool))


def data_digest(dataset: Any) -> str:
    """SHA-256 over a dataset's images and labels (what learned triggers are trained on).

    Fast path for uint8 ``images`` arrays; other datasets hash their float images. Part of
    the cache keys of prepared attacks, so it must not change.
    """
    h = hashlib.sha256()
    labels = dataset_labels(dataset)
    images = getattr(dataset, "images", None)
    if isinstance(images, np.ndarray) and len(images) == len(labels):
        h.update(f"{images.dtype}|{images.shape}|".encode())
        h.update(np.ascontiguousarray(images).tobytes())
    else:
        for start in range(0, len(labels), 1024):
            x = stack_clean(dataset, np.arange(start, min(start + 1024, len(labels))))
            h.update(x.numpy().tobytes())
    h.update(labels.tobytes())
    return h.hexdigest()


def choose_poisoned(attack: "Attack", labels: np.ndarray, *, none_eligible: str | None = None,
                    items: str = "samples") -> tuple[np.ndarray, np.random.Generator]:
    """The sorted indices :meth:`Attack.poison` poisons, and the generator after the draw.

    ``round(poison_rate * n_eligible)`` eligible samples drawn with
    ``numpy.random.default_rng(seed)``; attacks that alter more samples draw them from the
    returned generator afterwards. ``none_eligible`` replaces the error message when no
    sample is eligible; ``items`` names the samples in the one when none is drawn.
    """
    candidates = np.flatnonzero(attack.eligible(labels))
    if len(candidates) == 0:
        if none_eligible is None:
            what = f"of target class {attack.target}" if attack.clean_label else "outside the target class"
            none_eligible = f"{attack.name}: the dataset has no samples {what} to poison"
        raise DataError(none_eligible)
    k = round(attack.poison_rate * len(candidates))
    if k == 0:
        raise ConfigError(f"poison_rate {attack.poison_rate} of {len(candidates)} eligible {items} "
                          f"poisons none; raise the rate")
    rng = np.random.default_rng(attack.seed)
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    return chosen, rng


def _class_info(ds: Any, dataset: Any, num_classes: int, name: str | None, prefix: str) -> None:
    """Set ``classes``, ``num_classes``, ``name`` and ``task`` (when the wrapped set names one) of a
    derived dataset ``ds`` wrapping ``dataset``."""
    classes = getattr(dataset, "classes", None)
    ds.classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
    ds.num_classes = int(num_classes)
    ds.name = name or f"{prefix}-{getattr(dataset, 'name', 'dataset')}"
    task = getattr(dataset, "task", None)
    if task is not None:
        ds.task = task


# --------------------------------------------------------------------------- datasets
class PoisonedDataset(Dataset):
    """A training set in which some samples carry the trigger (applied lazily at access).

    ``dataset[i]`` returns ``(image, label)``: the triggered image when ``poison_flag[i]``,
    else the clean one, and the post-poison label ``labels[i]``. Numpy attributes:
    ``original_index`` (index into the wrapped dataset), ``original_label``,
    ``poison_flag`` (bool) and ``labels``; ``classes`` / ``num_classes`` pass through.
    """

    def __init__(self, dataset: Any, trigger: Trigger, poison_flag: np.ndarray, labels: np.ndarray,
                 original_label: np.ndarray, num_classes: int, name: str | None = None):
        n = len(dataset)
        self.dataset = dataset
        self.trigger = trigger
        self.original_index = np.arange(n, dtype=np.int64)
        self.original_label = np.asarray(original_label, dtype=np.int64)
        self.poison_flag = np.asarray(poison_flag, dtype=bool)
        self.labels = np.asarray(labels, dtype=np.int64)
        if not (len(self.original_label) == len(self.poison_flag) == len(self.labels) == n):
            raise DataError("poison flags and labels must have one entry per sample")
        _class_info(self, dataset, num_classes, name, "poisoned")

    @property
    def poison_indices(self) -> np.ndarray:
        """Indices of the poisoned samples."""
        return np.flatnonzero(self.poison_flag)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image, C x H x W."""
        shape = getattr(self.dataset, "image_shape", None)
        return tuple(shape) if shape is not None else tuple(self[0][0].shape)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img, _ = self.dataset[int(self.original_index[index])]
        if self.poison_flag[index]:
            img = self.trigger.apply(img)
        return img, int(self.labels[index])

    def as_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples at once: (N x C x H x W float images, N int64 labels), equal to item access."""
        x = _stack_images(self.dataset, self.original_index, self.trigger, self.poison_flag)
        return x, torch.from_numpy(self.labels.copy())

    def __repr__(self) -> str:
        return (f"PoisonedDataset(name={self.name!r}, n={len(self)}, "
                f"poisoned={int(self.poison_flag.sum())}, trigger={self.trigger!r})")


class _TargetedItems:
    """For backdoor test sets: items ``original_index`` of the wrapped ``dataset``, returned with
    ``targets`` (also ``labels``) instead of their own labels."""

    @property
    def labels(self) -> np.ndarray:
        """The labels this dataset returns (the attack targets)."""
        return self.targets

    def __len__(self) -> int:
        return len(self.targets)

    def _source_item(self, index: int):
        """The wrapped dataset's input for item ``index`` (its own label dropped)."""
        x, _ = self.dataset[int(self.original_index[index])]
        return x


class BackdoorTestSet(_TargetedItems, Dataset):
    """Triggered test images with the attack's target labels.

    ``dataset[i]`` returns ``(triggered image, target label)``. Numpy attributes:
    ``targets`` (what the attack wants predicted), ``true_labels`` (the image's real
    class) and ``original_index`` (index into the wrapped test set).
    """

    def __init__(self, dataset: Any, trigger: Trigger, original_index: np.ndarray,
                 true_labels: np.ndarray, targets: np.ndarray, num_classes: int, name: str | None = None):
        self.dataset = dataset
        self.trigger = trigger
        self.original_index = np.asarray(original_index, dtype=np.int64)
        self.true_labels = np.asarray(true_labels, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        if not (len(self.original_index) == len(self.true_labels) == len(self.targets)):
            raise DataError("indices, true labels and targets must have the same length")
        _class_info(self, dataset, num_classes, name, "backdoor")

    def __getitem__(self, index: int):
        return self.trigger.apply(self._source_item(index)), int(self.targets[index])

    def as_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples at once: (N x C x H x W triggered images, N int64 targets)."""
        flags = np.ones(len(self), dtype=bool)
        x = _stack_images(self.dataset, self.original_index, self.trigger, flags)
        return x, torch.from_numpy(self.targets.copy())

    def __repr__(self) -> str:
        return f"BackdoorTestSet(name={self.name!r}, n={len(self)}, trigger={self.trigger!r})"


# --------------------------------------------------------------------------- attack
class Attack:
    """A data-poisoning backdoor attack.

    ``target``: the target class (all2one); ``poison_rate``: share of the ELIGIBLE training
    samples that are poisoned, exactly ``round(poison_rate * n_eligible)`` of them, chosen
    with ``numpy.random.default_rng(seed)``. Eligible samples are the non-target ones for
    all2one, all samples for all2all (target ``(y + 1) % C``) and the target-class ones for
    clean-label attacks (``clean_label = True``: labels stay unchanged).
    ``num_classes`` may be given up front; otherwise the first poisoned / tested dataset
    fixes it.

    Subclasses set ``name``, build ``self.trigger`` and list their own constructor
    arguments in :meth:`_spec_args`.
    """

    name = "attack"
    clean_label = False
    default_poison_rate = 0.1
    #: True for attacks that need auxiliary models or generators (see :meth:`prepare`).
    needs_preparation = False

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None):
        if poison_rate is None:
            poison_rate = self.default_poison_rate
        if isinstance(target, bool) or not isinstance(target, numbers.Integral) or target < 0:
            raise ConfigError(f"target label must be an integer >= 0, got {target!r}")
        if isinstance(poison_rate, bool) or not isinstance(poison_rate, numbers.Real) \
                or not 0.0 < float(poison_rate) <= 1.0:
            raise ConfigError(f"poison_rate must be in (0, 1], got {poison_rate!r}")
        if mode not in MODES:
            hint = " (use style= for the trigger's paste/blend/add choice)" if mode in ("paste", "blend", "add") else ""
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}{hint}")
        if self.clean_label and mode != "all2one":
            raise ConfigError(f"{self.name} is a clean-label attack: only mode all2one is possible")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
                raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
            num_classes = int(num_classes)
            self._check_target(num_classes, int(target))
        self.target = int(target)
        self.poison_rate = float(poison_rate)
        self.mode = mode
        self.seed = int(seed)
        self.num_classes = num_classes
        self.trigger: Trigger  # set by subclasses

    # -- labels -------------------------------------------------------------------------
    def _check_target(self, num_classes: int, target: int | None = None) -> None:
        target = self.target if target is None else target
        if target >= num_classes:
            raise ConfigError(f"target label {target} out of range for {num_classes} classes")

    def _bind(self, dataset: Any) -> int:
        """Check the dataset's class count against the attack and fix ``num_classes``."""
        n = dataset_num_classes(dataset, self.num_classes)
        if self.num_classes is not None and n != self.num_classes:
            raise ConfigError(f"attack set up for {self.num_classes} classes but the dataset has {n}")
        self._check_target(n)
        self.num_classes = n
        return n

    def target_for(self, label: int) -> int:
        """The label the backdoor should produce for an image of class ``label``."""
        if self.mode == "all2one":
            return self.target
        if self.num_classes is None:
            raise ConfigError("all2all targets need num_classes (give it to the attack or poison a dataset first)")
        return (int(label) + 1) % self.num_classes

    def targets_for(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Vectorised :meth:`target_for`."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.mode == "all2one":
            return np.full_like(labels, self.target)
        if self.num_classes is None:
            raise ConfigError("all2all targets need num_classes (give it to the attack or poison a dataset first)")
        return (labels + 1) % self.num_classes

    # -- trigger ------------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of ``x`` (C x H x W or N x C x H x W, floats in [0, 1])."""
        return self.trigger.apply(x)

    # -- preparation --------------------------------------------------------------------
    def prepare(self, train_set: Any, *, cache_dir: Any = None, device: Any = "cpu",
                progress: bool = False) -> None:
        """Build what the attack needs before poisoning (auxiliary models, generators).

        Attacks with ``needs_preparation = True`` override this: they train on the clean
        ``train_set`` (on ``device``), save their files under ``cache_dir`` (default: the
        fipurify cache's ``attacks/`` folder) and record them in :meth:`to_spec`. The base
        attack needs nothing: this does nothing.
        """
        return None

    # -- datasets -----------------------------------------------------------------------
    def eligible(self, labels: np.ndarray) -> np.ndarray:
        """Boolean mask of the training samples that may be poisoned."""
        if self.clean_label:
            return labels == self.target
        if self.mode == "all2all":
            return np.ones(len(labels), dtype=bool)
        return labels != self.target

    def _plan_poison(self, labels: np.ndarray, relabel: Callable[[np.ndarray], np.ndarray] | None = None,
                     **choose: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What poisoning ``labels`` changes: the indices :func:`choose_poisoned` draws (``choose``:
        its message options), their boolean flags, and a copy of ``labels`` with the chosen rows
        replaced by ``relabel(labels[chosen])`` (left unchanged when ``relabel`` is None)."""
        chosen, _ = choose_poisoned(self, labels, **choose)
        flags = np.zeros(len(labels), dtype=bool)
        flags[chosen] = True
        new_labels = labels.copy()
        if relabel is not None:
            new_labels[chosen] = relabel(labels[chosen])
        return chosen, flags, new_labels

    def poison(self, dataset: Any) -> PoisonedDataset:
        """Poison a training set; see the class docstring for which samples and how many."""
        n_classes = self._bind(dataset)
        labels = dataset_labels(dataset)
        _, flags, new_labels = self._plan_poison(labels, None if self.clean_label else self.targets_for)
        return PoisonedDataset(dataset, self.trigger, flags, new_labels, labels, n_classes)

    def backdoor_test_set(self, dataset: Any) -> BackdoorTestSet:
        """Triggered test images: non-target classes (all2one, clean-label) or all (all2all)."""
        n_classes = self._bind(dataset)
        labels = dataset_labels(dataset)
        if self.mode == "all2all":
            idx = np.arange(len(labels), dtype=np.int64)
        else:
            idx = np.flatnonzero(labels != self.target)
        if len(idx) == 0:
            raise DataError(f"{self.name}: the test set has no images outside the target class {self.target}")
        return BackdoorTestSet(dataset, self.trigger, idx, labels[idx], self.targets_for(labels[idx]),
                               n_classes)

    # -- spec ---------------------------------------------------------------------------
    def _spec_args(self) -> dict:
        """Subclass constructor arguments beyond the common ones, JSON-serialisable."""
        return {}

    def to_spec(self) -> dict:
        """JSON-serialisable description; :func:`from_spec` rebuilds an identical attack."""
        spec = {"name": self.name, "target": self.target, "poison_rate": self.poison_rate,
                "mode": self.mode, "seed": self.seed, "num_classes": self.num_classes}
        spec.update(self._spec_args())
        spec["trigger"] = self.trigger.to_spec()
        return spec

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self._spec_args().items() if not isinstance(v, list))
        return (f"{type(self).__name__}(target={self.target}, poison_rate={self.poison_rate}, "
                f"mode={self.mode!r}, seed={self.seed}{', ' + extra if extra else ''})")


#: Attacks by name: each attack module registers its class (``ATTACKS.register(BadNets.name, BadNets)``)
#: and its aliases (``ATTACKS.alias("troj-one", "trojan", mode="all2one")``).
ATTACKS = Registry("attack", normalize=lambda name: str(name).strip().lower().replace("_", "-"))


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def from_spec(spec: dict) -> Attack:
    """Rebuild an attack from :meth:`Attack.to_spec` output (also after a JSON round trip).

    The attack is rebuilt from its arguments; the stored ``trigger`` entry must then match
    the rebuilt trigger, which catches specs written by an incompatible version.
    """
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError("not an attack spec: a dict with a 'name' entry is expected")
    name = spec["name"]
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r} in spec; known: {', '.join(sorted(ATTACKS))}")
    args = {k: v for k, v in spec.items() if k not in ("name", "trigger")}
    try:
        attack = ATTACKS[name](**args)
    except TypeError as exc:
        raise ConfigError(f"bad {name} attack spec: {exc}") from None
    stored = spec.get("trigger")
    if stored is not None and _json_roundtrip(stored) != _json_roundtrip(attack.trigger.to_spec()):
        raise ConfigError(f"{name} spec: the stored trigger differs from the one its arguments build")
    return attack


__all__ = ["ATTACKS", "Attack", "PoisonedDataset", "BackdoorTestSet", "from_spec", "dataset_labels",
           "dataset_num_classes", "stack_clean", "data_digest", "choose_poisoned", "trigger_from_spec", "MODES"]
