"""The common paths glued together: data with a clean reserve, backdoor training, evaluation.

The CLI and the benchmarks both call these, so there is one definition of how a
backdoored model and its clean reserve are made. Purifying one and measuring it is
:func:`fipurify.purification.purify_model`, built on these.

Every task goes through the same path; what differs is read from the dataset and its
:class:`~fipurify.tasks.Task` and recorded in the model's ``dataset`` metadata
(:func:`dataset_facts`): the task name, the input shape (``image_shape`` C,H,W for images and
mosaics, ``point_shape`` N,3 for point clouds, ``clip_shape`` T,C,H,W for clips) or, for
translation, ``vocab_size`` and the tokenizer itself (``tokenizer``: its JSON text and the
SHA-256 of that text, so the model file alone rebuilds the exact token ids; see
:func:`side_options`). Metrics come from :func:`fipurify.metrics.evaluate_task`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import attacks, datasets, models
from .version import __version__
from .datasets.base import ArrayDataset
from .errors import ConfigError, DataError, FipurifyError
from .metrics import evaluate_task
from .tasks import Classification, task_of
from .training import TrainConfig, train_model

#: How a translation model's tokenizer is stored in its metadata (``dataset.tokenizer.format``).
TOKENIZER_FORMAT = "hf-tokenizers-json"


@dataclass
class DataBundle:
    """A training part, its clean reserve (never poisoned, never trained on) and the test set
    (ArrayDatasets for images; the task's own dataset class otherwise, e.g. PointCloudDataset)."""
    train: ArrayDataset
    reserve: ArrayDataset
    test: ArrayDataset
    reserve_info: dict[str, Any]
    dataset_info: dict[str, Any]


def dataset_facts(name: str, train: Any) -> dict[str, Any]:
    """What a model's metadata records about its dataset (besides sizes): name, task, classes and
    input shape, or (translation) the vocabulary size and the tokenizer (see the module docstring)."""
    task = task_of(train)
    classes = getattr(train, "classes", None)
    info: dict[str, Any] = {"name": name, "task": task.name, "num_classes": getattr(train, "num_classes", None),
                            "classes": list(classes) if classes is not None else None}
    for key in ("image_shape", "point_shape", "clip_shape"):
        shape = getattr(train, key, None)
        if shape is not None:
            info[key] = list(shape)
            break
    tokenizer = getattr(train, "tokenizer", None)
    if tokenizer is not None:
        text = tokenizer.to_json()
        info["vocab_size"] = int(tokenizer.vocab_size)
        info["tokenizer"] = {"format": TOKENIZER_FORMAT, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                             "json": text}
    return info


def side_options(dataset_meta: dict[str, Any]) -> dict[str, Any]:
    """Loader options rebuilt from a model's ``dataset`` metadata that are not plain JSON options:
    the tokenizer of a translation model (checked against its recorded SHA-256; never unpickled)."""
    tok = dataset_meta.get("tokenizer")
    if not tok:
        return {}
    from .text.tokenizer import SubwordTokenizer

    text = tok.get("json") if isinstance(tok, dict) else None
    if tok.get("format") != TOKENIZER_FORMAT or not isinstance(text, str):
        raise DataError(f"the model's tokenizer is not stored as {TOKENIZER_FORMAT} text")
    if hashlib.sha256(text.encode()).hexdigest() != tok.get("sha256"):
        raise DataError("the model's stored tokenizer does not match its recorded SHA-256 (edited metadata?)")
    return {"tokenizer": SubwordTokenizer.from_json(text)}


def load_data(name: str, root: str | None = None, reserve: int | float = 0.1, seed: int = 0,
              train_limit: int | None = None, side: dict[str, Any] | None = None, **load_kw) -> DataBundle:
    """Load ``name``'s train and test splits and split a seeded clean reserve off the training set.

    ``train_limit`` keeps a seeded random subset of the training set first (for quick demos).
    ``load_kw`` are the loader's options (JSON values, recorded as ``load_kwargs``); ``side``
    are options rebuilt from a model file (:func:`side_options`), passed on but not recorded.
    The reserve is stratified by class where an item has one class, else a seeded random draw.
    """
    train = datasets.load(name, root=root, split="train", **load_kw, **(side or {}))
    test = datasets.load(name, root=root, split="test", **load_kw, **(side or {}))
    limit_info = None
    if train_limit is not None and train_limit < len(train):
        if train_limit < 2:
            raise ConfigError(f"train_limit must be >= 2, got {train_limit}")
        g = torch.Generator().manual_seed(seed + 7919)
        keep = torch.randperm(len(train), generator=g)[:train_limit].sort().values.numpy()
        train = train.subset(keep)
        limit_info = {"n": int(train_limit), "seed": seed + 7919}
    part, res, idx = datasets.split_reserve(train, reserve, seed)
    reserve_info = {"size": int(len(idx)), "seed": int(seed), "requested": reserve,
                    "sha256": datasets.indices_digest(idx), "train_limit": limit_info}
    info = {**dataset_facts(name, train), "n_train": len(part), "n_test": len(test)}
    if load_kw:
        info["load_kwargs"] = load_kw
    return DataBundle(part, res, test, reserve_info, info)


def reload_data(metadata: dict[str, Any], root: str | None = None) -> DataBundle:
    """Rebuild the exact data split a saved model was trained with, checking the reserve digest."""
    ds = metadata.get("dataset")
    res = metadata.get("clean_reserve")
    if not ds or not res:
        raise DataError("the model's metadata does not say which dataset and clean reserve it was trained "
                        "with; pass your own clean data instead")
    limit = (res.get("train_limit") or {}).get("n")
    bundle = load_data(ds["name"], root, res["requested"], res["seed"], limit, side_options(ds),
                       **ds.get("load_kwargs", {}))
    if bundle.reserve_info["sha256"] != res["sha256"]:
        raise DataError("the clean reserve drawn from this copy of the dataset differs from the one the "
                        "model was trained with (different dataset files?)")
    return bundle


def reserve_sample(metadata: dict[str, Any], size: int, seed: int = 0, root: str | None = None) -> Any:
    """Up to ``size`` items of the clean reserve a saved model was trained beside, drawn class-balanced
    with ``seed`` (:func:`fipurify.datasets.draw_clean_subset`); the whole reserve when it is smaller."""
    reserve = reload_data(metadata, root).reserve
    return datasets.draw_clean_subset(reserve, min(size, len(reserve)), seed)


def model_inputs(info: dict[str, Any]) -> dict[str, Any]:
    """The :func:`fipurify.models.create` arguments that size a model for a dataset's items
    (``info`` as :func:`dataset_facts` records it): classes, channels and side of images and
    clips, coordinates and points of clouds, the vocabulary of a translation model."""
    if "vocab_size" in info:
        return {"vocab_size": int(info["vocab_size"])}
    out: dict[str, Any] = {"num_classes": info["num_classes"]}
    if "point_shape" in info:
        n, c = info["point_shape"]
        return {**out, "in_channels": c, "input_size": n}
    shape = info.get("image_shape") or (info.get("clip_shape") or [None])[1:]
    if not shape or shape[0] is None:
        raise DataError(f"the dataset {info.get('name')} records no input shape to size a model by")
    c, h = shape[0], shape[1]
    return {**out, "in_channels": c, "input_size": h, "stats_channels": c}


def build_model(arch: str, bundle: DataBundle, width: int | None = None, seed: int = 0, **kw) -> nn.Module:
    """A freshly initialised model sized for ``bundle``'s items (:func:`model_inputs`) and classes."""
    sizes = model_inputs(bundle.dataset_info)
    c = sizes.pop("stats_channels", None)
    if width is not None:
        kw["width"] = width
    if c is not None and "mean" not in kw and "std" not in kw:
        kw["mean"], kw["std"] = models.dataset_stats(bundle.dataset_info["name"], c)
    torch.manual_seed(seed)
    return models.create(arch, **sizes, **kw)


def check_model_takes(model: nn.Module, dataset: Any, arch: str) -> None:
    """One forward pass on one item of ``dataset`` (its task's): a one-line DataError, before any
    training, when the architecture does not take this task's items (e.g. an image network on
    point clouds)."""
    task = task_of(dataset)
    item = dataset[0]
    collate = task.collate_fn or torch.utils.data.default_collate
    x, y = collate([item])
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            task.forward(model, x.to(device), torch.as_tensor(y).to(device))
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError, FipurifyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{arch} does not take the items of {getattr(dataset, 'name', 'this dataset')} "
                        f"({task.name}): {first}") from None
    finally:
        model.train(was_training)


def train_backdoored(bundle: DataBundle, arch: str, attack: attacks.Attack | None,
                     config: TrainConfig, width: int | None = None, progress: bool = True,
                     log=print, defense=None, device: str | torch.device | None = None,
                     checkpoint: str | os.PathLike | None = None,
                     **arch_kw) -> tuple[nn.Module, dict[str, Any]]:
    """Train a clean (``attack=None``) or backdoored model; returns it with its metadata.

    With ``defense`` (a :class:`~fipurify.defenses.training_time.TrainingDefense`) the model
    is trained through it on the poisoned set (its own schedule; ``config`` gives the seed);
    its report goes into the metadata as ``training_defense``. ``device`` places the model
    (default: the CPU). ``checkpoint`` makes plain training resumable (see
    :func:`~fipurify.training.train_model`; not with a training-time defense).

    Attacks with ``needs_preparation`` (learned triggers) are prepared first on the
    training part (never the clean reserve); their spec in the metadata names the files
    they saved, and is checked to rebuild, so the backdoor test set can be rebuilt later.
    """
    if checkpoint is not None and defense is not None:
        raise ConfigError("a training-time defense follows its own schedule and cannot resume from a checkpoint")
    model = build_model(arch, bundle, width, config.seed, **arch_kw)
    task = task_of(bundle.train)
    if device is not None:  # e.g. "cuda"; data stay on the CPU and move batch by batch
        model = model.to(device)
    if task.name != "image-classification":  # images: the path (and its random stream) as it always was
        check_model_takes(model, bundle.train, arch)
    if attack is not None and getattr(attack, "needs_preparation", False):
        if log:
            log(f"preparing the {attack.name} attack (learned parts are cached after the first run)")
        attack.prepare(bundle.train, device=next(model.parameters()).device, progress=progress)
        attacks.from_spec(json.loads(json.dumps(attack.to_spec())))  # fails now, not at evaluation time
    train_set = attack.poison(bundle.train) if attack is not None else bundle.train
    backdoor_test = attack.backdoor_test_set(bundle.test) if attack is not None else None
    if defense is not None:
        from .defenses.training_time import format_record
        model = defense.train(model, train_set, progress=progress,
                              callback=(lambda rec: log(format_record(rec))) if log else None)
        history = defense.report.get("history", [])
    else:
        # the task is given: a poisoned set need not carry its dataset's task
        history = train_model(model, train_set, config, clean_test=bundle.test, backdoor_test=backdoor_test,
                              progress=progress, log=log, task=task, checkpoint=checkpoint)
    final = evaluate_task(model, bundle.test, backdoor_test, task)
    keep = ("acc", "asr", "lcr") if isinstance(task, Classification) else \
        tuple(k for k in final if not k.startswith("n_"))
    meta = {"fipurify_version": __version__, "dataset": bundle.dataset_info,
            "clean_reserve": bundle.reserve_info, "attack": attack.to_spec() if attack else None,
            "train_config": config.to_dict(), "seed": config.seed, "history": history,
            "metrics": {k: final[k] for k in keep}}
    if defense is not None:
        meta["training_defense"] = {k: v for k, v in defense.report.items() if k != "history"}
    return model, meta


def evaluate_saved(model: nn.Module, metadata: dict[str, Any], root: str | None = None,
                   bundle: DataBundle | None = None) -> dict[str, Any]:
    """The task's metrics (:func:`~fipurify.metrics.evaluate_task`: ACC / ASR / LCR for classifiers)
    of ``model`` on the test set and attack recorded in ``metadata``."""
    bundle = bundle or reload_test_only(metadata, root)
    attack_spec = metadata.get("attack")
    backdoor_test = attacks.from_spec(attack_spec).backdoor_test_set(bundle.test) if attack_spec else None
    return evaluate_task(model, bundle.test, backdoor_test)


def reload_test_only(metadata: dict[str, Any], root: str | None = None) -> DataBundle:
    """Only the test split of the model's dataset (no reserve check), for evaluation."""
    ds = metadata.get("dataset")
    if not ds:
        raise DataError("the model's metadata names no dataset; evaluate it with your own test data in Python")
    test = datasets.load(ds["name"], root=root, split="test", **ds.get("load_kwargs", {}), **side_options(ds))
    return DataBundle(test.subset([]), test.subset([]), test, {}, ds)


def probe_model(model: nn.Module, shape: tuple[int, int, int], where: str = "") -> int:
    """The number of outputs of ``model`` for one ``shape`` (C, H, W) image; DataError if it does not take it."""
    c, h, w = shape
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.full((1, c, h, w), 0.5, device=device))
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"the model does not take {c}x{h}x{w} images{where} ({first})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise DataError(f"the model's output for one image is not one row of class scores "
                        f"({type(out).__name__} {tuple(getattr(out, 'shape', ()))})")
    return int(out.shape[1])


def model_classes(metadata: dict[str, Any]) -> tuple[int | None, list[str] | None, list[int] | None]:
    """``(num_classes, class names, image shape C,H,W)`` recorded in a model's metadata (None where unknown)."""
    ds = metadata.get("dataset") or {}
    names = ds.get("classes") or metadata.get("classes")
    n = ds.get("num_classes") or (len(names) if names else None)
    return n, (list(names) if names else None), ds.get("image_shape")


def load_clean_folder(model: nn.Module, metadata: dict[str, Any], folder: str,
                      warn=print) -> ArrayDataset:
    """A user's clean ``folder/<class>/*`` checked against ``model`` before any compute.

    Checks classes (count and names), image size (one forward pass) and channels; warns
    about skipped non-image files, grayscale images and resizing (through ``warn``).
    """
    from .datasets.imagefolder import scan_image_folder
    from .validation import check_clean_folder

    scan = scan_image_folder(folder)
    n_classes, names, shape = model_classes(metadata)
    spec = getattr(model, "fipurify_spec", None) or {}
    channels = shape[0] if shape else spec.get("kwargs", {}).get("in_channels")
    if shape:
        size = (int(shape[1]), int(shape[2]))
        other = sorted(s for s in scan.sizes if s != size)
        if other:
            warn(f"resizing the {', '.join(f'{h}x{w}' for h, w in other)} images in {folder} to the model's "
                 f"{size[0]}x{size[1]}")
    else:
        if len(scan.sizes) > 1:
            raise DataError(f"the images in {folder} have {len(scan.sizes)} sizes "
                            f"({', '.join(f'{h}x{w}' for h, w in sorted(scan.sizes)[:4])}); resize them to the "
                            "size the model takes")
        size = next(iter(scan.sizes))
    outputs = probe_model(model, (3 if channels is None else int(channels), *size), f" such as those in {folder}")
    if n_classes is not None and outputs != n_classes:
        raise DataError(f"the model has {outputs} outputs but its metadata records {n_classes} classes")
    for message in check_clean_folder(scan, outputs, names, channels):
        warn(message)
    return datasets.load("imagefolder", root=folder, split=None, classes=names, size=size)
