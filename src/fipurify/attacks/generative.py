"""Shared machinery of the generator-based attacks (Dynamic, LIRA, ISSBA, FBA).

These attacks learn their trigger: a small network maps each image to its triggered
version. :meth:`GeneratorAttack.prepare` trains that network once on the training set
(the attacker's stage 1), saves its weights under ``<cache>/attacks/`` as a
safetensors file named after a digest of the full configuration and of the data, and
reuses the file when it is already there. The attack spec then refers to the file by
name and SHA-256, so :func:`~fipurify.attacks.from_spec` on a saved model's metadata
loads the very same generator; a missing or modified file raises ModelFileError
saying what is missing and how to rebuild it.

Triggered images are computed in batches when a dataset is poisoned or a backdoor
test set is built, and kept in memory (:class:`GeneratedPoisonedDataset`,
:class:`GeneratedBackdoorTestSet`): per-item access and ``as_arrays`` then return the
very same tensors, and the generator runs once per image instead of once per epoch.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttackError, ConfigError, DataError, ModelFileError
from .base import Attack, BackdoorTestSet, PoisonedDataset, data_digest, dataset_labels, stack_clean
from .triggers import Trigger, _batched

#: Subfolder of the fipurify cache that holds the trained generators.
CACHE_SUBDIR = "attacks"
#: Bumped when the training code changes in a way that changes the generators (an attack
#: whose own training changed bumps its ``generator_format`` instead).
GENERATOR_FORMAT = 1
#: A triggered image "differs" from its clean image when some pixel moves by at least this
#: (one 8-bit intensity level); a generator that leaves most images unchanged is degenerate.
_VISIBLE = 1.0 / 255
_PROBE = 256
_META_KEY = "fipurify-attack-generator"
_CHUNK = 256


# --------------------------------------------------------------------------- small networks
class ConvAutoencoder(nn.Module):
    """A tiny U-Net: two 3x3 conv levels (full and half resolution) with one skip connection.

    Fully convolutional, so it takes any image size; ``extra`` input channels (e.g. a
    broadcast secret code) are concatenated to the image by the caller.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16):
        super().__init__()
        w = int(width)
        self.enc1 = nn.Conv2d(in_channels, w, 3, padding=1)
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.dec1 = nn.Conv2d(3 * w, w, 3, padding=1)
        self.out = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = F.relu(self.enc1(x))
        m = F.relu(self.mid(F.relu(self.down(e1))))
        up = F.interpolate(m, size=e1.shape[-2:], mode="nearest")
        return self.out(F.relu(self.dec1(torch.cat([up, e1], dim=1))))


class SmallCNN(nn.Module):
    """A small classifier (the attacker's surrogate, or ISSBA's code decoder).

    ``pool`` is the side of the final average-pooled feature map fed to the linear head
    (1: global pooling; a decoder of spatial codes keeps a coarse grid).
    """

    def __init__(self, in_channels: int, num_outputs: int, width: int = 16, pool: int = 1):
        super().__init__()
        w, pool = int(width), int(pool)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.head = nn.Linear(4 * w * pool * pool, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - 0.5) / 0.25))  # centre [0, 1] pixels


# --------------------------------------------------------------------------- data helpers
def image_shape_of(dataset: Any) -> tuple[int, int, int]:
    """C x H x W of the dataset's images."""
    shape = getattr(dataset, "image_shape", None)
    if shape is None:
        if len(dataset) == 0:
            raise DataError("the dataset is empty")
        shape = dataset[0][0].shape
    return tuple(int(s) for s in shape)


class ImageSource:
    """Training images served in batches as float N x C x H x W tensors in [0, 1].

    ArrayDataset-like inputs stay uint8 in memory (converted per batch, exactly like
    item access); other datasets are read once into a float tensor.
    """

    def __init__(self, dataset: Any):
        images = getattr(dataset, "images", None)
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 \
                and len(images) == len(dataset):
            self._u8 = torch.from_numpy(images).permute(0, 3, 1, 2)
            self._float = None
        else:
            n = len(dataset)
            self._u8 = None
            self._float = stack_clean(dataset, np.arange(n))
        self.labels = torch.from_numpy(dataset_labels(dataset).copy())

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        if self._u8 is not None:
            return self._u8[idx].float().div_(255.0).to(device)
        return self._float[idx].to(device)

    def probe(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The first (up to) ``_PROBE`` images: a fixed batch for checking a generator."""
        return self.batch(torch.arange(min(len(self), _PROBE)), device)

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Index tensors of one shuffled epoch (the last, short batch is kept if >= 2 samples)."""
        perm = torch.randperm(len(self), generator=generator)
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            if len(idx) >= 2:
                yield idx


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance of two batches (the Dynamic diversity metric)."""
    # the small constant keeps the gradient of sqrt finite when two outputs coincide
    return ((a - b).pow(2).flatten(1).mean(1) + 1e-12).sqrt()


# --------------------------------------------------------------------------- trigger
class GeneratorTrigger(Trigger):
    """The learned trigger of a :class:`GeneratorAttack`: ``apply`` runs the attack's generator.

    Works on one image or a batch (run in chunks, no gradients); the images must have
    the shape the generator was trained on. The spec names the generator file.
    """

    kind = "generator"

    def __init__(self, attack: "GeneratorAttack"):
        self.attack = attack

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb, single = _batched(x)
        a = self.attack
        if a.nets is None:
            raise ConfigError(f"the {a.name} trigger generator is not trained yet: call "
                              f"attack.prepare(train_set) (fipurify train does this) or attack.poison(train_set)")
        a.check_image_shape(tuple(xb.shape[1:]))
        dev = next(a.nets.parameters()).device
        parts = []
        with torch.no_grad():
            for start in range(0, len(xb), _CHUNK):
                chunk = xb[start:start + _CHUNK].to(device=dev, dtype=torch.float32)
                parts.append(a.generate(chunk).clamp_(0.0, 1.0).to(device=xb.device, dtype=xb.dtype))
        out = torch.cat(parts) if parts else xb.clone()
        return out[0] if single else out

    def to_spec(self) -> dict:
        a = self.attack
        ref = a.generator_ref or {}
        return {"type": self.kind, "attack": a.name,
                "image_shape": list(a.image_shape) if a.image_shape else None,
                "file": ref.get("file"), "sha256": ref.get("sha256")}

    def __repr__(self) -> str:
        ref = self.attack.generator_ref
        return f"GeneratorTrigger({self.attack.name}, file={ref['file'] if ref else None!r})"


# --------------------------------------------------------------------------- datasets
class GeneratedPoisonedDataset(PoisonedDataset):
    """A PoisonedDataset whose modified images were generated once, in batches, and kept.

    ``modified_index`` lists the rows whose image differs from the clean one: the
    poisoned rows, plus for Dynamic the cross-trigger rows (``cross_flag``: another
    image's trigger, true label kept; ``cross_partner``: whose trigger).
    """

    def __init__(self, base: PoisonedDataset, rows: np.ndarray, images: torch.Tensor,
                 cross_flag: np.ndarray | None = None, cross_partner: np.ndarray | None = None):
        super().__init__(base.dataset, base.trigger, base.poison_flag, base.labels, base.original_label,
                         base.num_classes, base.name)
        self.modified_index = np.asarray(rows, dtype=np.int64)
        if len(self.modified_index) != len(images):
            raise DataError("one generated image per modified row is needed")
        self._images = images
        self._slot = np.full(len(self.labels), -1, dtype=np.int64)
        self._slot[self.modified_index] = np.arange(len(self.modified_index))
        n = len(self.labels)
        self.cross_flag = np.zeros(n, dtype=bool) if cross_flag is None else np.asarray(cross_flag, dtype=bool)
        self.cross_partner = np.full(n, -1, dtype=np.int64) if cross_partner is None \
            else np.asarray(cross_partner, dtype=np.int64)

    def __getitem__(self, index: int):
        slot = self._slot[index]
        if slot >= 0:
            return self._images[slot].clone(), int(self.labels[index])
        img, _ = self.dataset[int(self.original_index[index])]
        return img, int(self.labels[index])

    def as_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = stack_clean(self.dataset, self.original_index)
        if len(self.modified_index):
            x[torch.from_numpy(self.modified_index)] = self._images
        return x, torch.from_numpy(self.labels.copy())


class GeneratedBackdoorTestSet(BackdoorTestSet):
    """A BackdoorTestSet whose triggered images were generated once, in batches, and kept."""

    def __init__(self, base: BackdoorTestSet, images: torch.Tensor):
        super().__init__(base.dataset, base.trigger, base.original_index, base.true_labels, base.targets,
                         base.num_classes, base.name)
        if len(images) != len(self.targets):
            raise DataError("one generated image per backdoor test sample is needed")
        self._images = images

    def __getitem__(self, index: int):
        return self._images[index].clone(), int(self.targets[index])

    def as_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._images.clone(), torch.from_numpy(self.targets.copy())


# --------------------------------------------------------------------------- option checks
def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def real_in(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as float, checked to lie in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if v > high or v < low or (low_open and v == low):
        raise ConfigError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v:g}")
    return v


def _file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` map of a safetensors file held in memory."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    return header.get("__metadata__") or {}


# --------------------------------------------------------------------------- attack
class GeneratorAttack(Attack):
    """Base class of the attacks whose trigger is a trained network.

    Subclasses implement :meth:`build_nets` (the networks to save), :meth:`fit` (train
    them in place; surrogate classifiers stay local and are discarded), :meth:`generate`
    (batched trigger) and :meth:`generator_options` (their constructor options that
    shape the generator, JSON types). ``label_dependent = True`` when the generator's
    training uses the labels and targets (Dynamic, LIRA): target, mode and labels then
    enter the cache key.

    ``image_shape`` and ``generator`` (``{"file", "sha256"}``) are filled in by
    :meth:`prepare` and written by :meth:`to_spec`; given to the constructor (as
    :func:`from_spec` does) they load the generator from ``<cache_dir>/attacks/``
    (``cache_dir`` defaults to :func:`fipurify.datasets.roots.cache_dir`, i.e.
    ``$FIPURIFY_CACHE`` or ``~/.cache/fipurify``).
    """

    needs_preparation = True
    label_dependent = False
    #: Part of the generator cache key; bumped by a subclass whose generator training changed.
    generator_format = GENERATOR_FORMAT

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, image_shape: Any = None,
                 generator: dict | None = None, cache_dir: str | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        self.image_shape = self._check_shape(image_shape)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.generator_ref: dict | None = None
        self.nets: nn.Module | None = None
        self.trigger = GeneratorTrigger(self)
        self._generator_arg = generator  # loaded by finish_init() once subclass options are set

    def finish_init(self) -> None:
        """Called by subclasses at the end of ``__init__``: loads a generator named in the spec."""
        ref = self._generator_arg
        if ref is None:
            return
        if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("sha256"), str):
            raise ConfigError(f"{self.name}: generator must be {{'file': NAME, 'sha256': HEX}}, got {ref!r:.100}")
        if self.image_shape is None or self.num_classes is None:
            raise ConfigError(f"{self.name}: a spec naming a generator must also give image_shape and num_classes")
        self._load(ref)

    def _set_generator_options(self, gen_epochs: Any, gen_width: Any, gen_lr: Any, gen_batch_size: Any) -> None:
        """Check and keep the generator-training options every generator attack has."""
        self.gen_epochs = positive_int("gen_epochs", gen_epochs)
        self.gen_width = positive_int("gen_width", gen_width)
        self.gen_lr = real_in("gen_lr", gen_lr, 0.0, 10.0, low_open=True)
        self.gen_batch_size = positive_int("gen_batch_size", gen_batch_size)

    def _set_surrogate_options(self, clf_width: Any, clf_lr: Any) -> None:
        """Check and keep the options of the surrogate classifier trained alongside the generator."""
        self.clf_width = positive_int("clf_width", clf_width)
        self.clf_lr = real_in("clf_lr", clf_lr, 0.0, 10.0, low_open=True)

    # -- subclass hooks -------------------------------------------------------------------
    def generator_options(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def build_nets(self, channels: int, num_classes: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, nets: nn.Module, source: ImageSource, device: torch.device, progress: bool) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def generate(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Triggered batch (float N x C x H x W on the nets' device); clamped by the caller."""
        raise NotImplementedError

    # -- shapes ---------------------------------------------------------------------------
    @staticmethod
    def _check_shape(shape: Any) -> tuple[int, int, int] | None:
        if shape is None:
            return None
        try:
            out = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ConfigError(f"image_shape must be [C, H, W], got {shape!r}") from None
        if len(out) != 3 or min(out) < 1:
            raise ConfigError(f"image_shape must be three positive sizes [C, H, W], got {shape!r}")
        return out

    def check_image_shape(self, shape: tuple[int, ...]) -> None:
        """DataError unless ``shape`` (C x H x W) is the one the generator was trained on."""
        shape = tuple(int(s) for s in shape)
        if self.image_shape is not None and shape != self.image_shape:
            fmt = lambda s: "x".join(map(str, s))  # noqa: E731
            raise DataError(f"the {self.name} trigger generator was trained on {fmt(self.image_shape)} images "
                            f"(C x H x W) but got {fmt(shape)} images; prepare the attack on data of this size")

    # -- cache ----------------------------------------------------------------------------
    @property
    def prepared(self) -> bool:
        """Whether the generator is trained or loaded."""
        return self.nets is not None

    def _folder(self, cache_dir: str | Path | None = None) -> Path:
        from ..datasets.roots import cache_dir as default_cache

        root = cache_dir if cache_dir is not None else self.cache_dir
        return (Path(root).expanduser() if root is not None else default_cache()) / CACHE_SUBDIR

    def generator_config(self) -> dict:
        """Everything that determines the trained generator (besides the data)."""
        cfg = {"attack": self.name, "format": self.generator_format, "seed": self.seed,
               "image_shape": list(self.image_shape) if self.image_shape else None,
               "options": self.generator_options()}
        if self.label_dependent:
            cfg.update(target=self.target, mode=self.mode, num_classes=self.num_classes)
        return cfg

    def _serialise(self) -> bytes:
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.nets.state_dict().items()}
        return save(state, metadata={_META_KEY: json.dumps(self.generator_config(), sort_keys=True)})

    def _install(self, data: bytes, file: str) -> None:
        """Build the nets from safetensors bytes (config must match) and record the reference."""
        from safetensors.torch import load

        try:
            meta = _header_metadata(data)
            state = load(data)
        except Exception as e:  # safetensors raises its own error types
            raise ModelFileError(f"{self.name} generator file {file} is not a valid safetensors file "
                                 f"({type(e).__name__}: {e})") from None
        stored = meta.get(_META_KEY)
        want = json.dumps(self.generator_config(), sort_keys=True)
        if stored != want:
            raise ModelFileError(f"{self.name} generator file {file} was made with other options or data "
                                 f"than this attack's spec")
        nets = self.build_nets(self.image_shape[0], self.num_classes)
        try:
            nets.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelFileError(f"{self.name} generator file {file} does not fit the generator: "
                                 f"{str(e).splitlines()[0]}") from None
        self.nets = nets.eval().requires_grad_(False)
        self.generator_ref = {"file": file, "sha256": _file_sha256(data)}

    def _load(self, ref: dict) -> None:
        path = self._folder() / ref["file"]
        rebuild = (f"it is written by attack.prepare(train_set) (fipurify train does this) into "
                   f"<cache>/{CACHE_SUBDIR}/, where <cache> is $FIPURIFY_CACHE or ~/.cache/fipurify: copy the "
                   f"file there, point FIPURIFY_CACHE at the cache holding it, or rebuild it by preparing the "
                   f"attack again on the same training data with the same options")
        if not path.is_file():
            raise ModelFileError(f"{self.name} trigger generator {ref['file']} not found in {path.parent}; {rebuild}")
        data = path.read_bytes()
        digest = _file_sha256(data)
        if digest != ref["sha256"]:
            raise ModelFileError(f"{self.name} trigger generator {path} has SHA-256 {digest[:12]}... but the "
                                 f"attack spec expects {ref['sha256'][:12]}...: the file was modified or "
                                 f"replaced; {rebuild}")
        self._install(data, ref["file"])

    def prepare(self, train_set: Any, *, cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                progress: bool = False) -> None:
        """Train the trigger generator on ``train_set`` (or reuse the cached one for the same
        configuration and data), save it under ``<cache_dir>/attacks/`` and keep it loaded."""
        n_classes = self._bind(train_set)
        shape = image_shape_of(train_set)
        self.check_image_shape(shape)
        if len(train_set) < 2:
            raise DataError(f"{self.name}: at least 2 training images are needed to train the trigger generator")
        self.image_shape = shape
        if cache_dir is not None:
            self.cache_dir = str(cache_dir)
        config = self.generator_config()
        digest = data_digest(train_set)
        key = hashlib.sha256(json.dumps({"config": config, "data": digest}, sort_keys=True).encode()).hexdigest()
        file = f"{self.name}-{key[:24]}.safetensors"
        path = self._folder() / file
        device = torch.device(device)
        if path.is_file():
            try:
                self._install(path.read_bytes(), file)
                self.nets.to(device)
                return
            except ModelFileError:
                pass  # a corrupt or foreign file under our key: train again and replace it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            nets = self.build_nets(shape[0], n_classes).to(device)
            source = ImageSource(train_set)
            self.fit(nets, source, device, progress)
        self.nets = nets.cpu().eval().requires_grad_(False)
        self._check_not_degenerate(source)
        from ..io import atomic_write_bytes

        data = self._serialise()
        atomic_write_bytes(path, data)
        self.generator_ref = {"file": file, "sha256": _file_sha256(data)}
        self.nets.to(device)  # generate the triggered images on the training device

    def _check_not_degenerate(self, source: "ImageSource") -> None:
        """AttackError when the trained generator leaves most images (visibly) unchanged.

        A collapsed generator (e.g. an all-zero Dynamic mask) would otherwise poison the
        training set with clean images and silently produce a model without a backdoor.
        """
        x = source.probe()
        with torch.no_grad():
            moved = (self.generate(x).clamp(0.0, 1.0) - x).flatten(1).abs().amax(1)
        unchanged = float((moved < _VISIBLE).float().mean())
        if unchanged > 0.5:
            raise AttackError(f"{self.name}: the trained trigger generator is degenerate: it leaves "
                              f"{100 * unchanged:.0f}% of {len(x)} training images unchanged (no pixel "
                              f"moves by one intensity level), so the poisoned set would carry no trigger. "
                              f"Train it with other options (more generator epochs, another gen_lr or seed)")

    # -- datasets -------------------------------------------------------------------------
    def _generate_rows(self, dataset: Any, rows: np.ndarray) -> torch.Tensor:
        """Triggered images of ``dataset[rows]`` (N x C x H x W float, CPU), computed in batches."""
        parts = []
        for start in range(0, len(rows), _CHUNK):
            idx = rows[start:start + _CHUNK]
            parts.append(self.trigger.apply(stack_clean(dataset, idx)))
        c, h, w = self.image_shape
        return torch.cat(parts) if parts else torch.empty(0, c, h, w)

    def _require_prepared(self, what: str) -> None:
        if not self.prepared:
            raise ConfigError(f"{self.name}: the trigger generator is not trained yet, so no {what} can be built; "
                              f"call attack.prepare(train_set) first")

    def poison(self, dataset: Any) -> GeneratedPoisonedDataset:
        """Poison a training set; trains the generator on it first if :meth:`prepare` was not called."""
        if not self.prepared:
            self.prepare(dataset)
        self.check_image_shape(image_shape_of(dataset))
        base = super().poison(dataset)
        rows = base.poison_indices
        return GeneratedPoisonedDataset(base, rows, self._generate_rows(dataset, rows))

    def backdoor_test_set(self, dataset: Any) -> GeneratedBackdoorTestSet:
        """Triggered test images (see :meth:`Attack.backdoor_test_set`); needs a prepared generator."""
        self._require_prepared("backdoor test set")
        self.check_image_shape(image_shape_of(dataset))
        base = super().backdoor_test_set(dataset)
        return GeneratedBackdoorTestSet(base, self._generate_rows(dataset, base.original_index))

    # -- spec -----------------------------------------------------------------------------
    def _spec_args(self) -> dict:
        args = dict(self.generator_options())
        args["image_shape"] = list(self.image_shape) if self.image_shape else None
        args["generator"] = dict(self.generator_ref) if self.generator_ref else None
        return args


__all__ = ["GeneratorAttack", "GeneratorTrigger", "GeneratedPoisonedDataset", "GeneratedBackdoorTestSet",
           "ConvAutoencoder", "SmallCNN", "ImageSource", "data_digest", "image_shape_of", "CACHE_SUBDIR"]
