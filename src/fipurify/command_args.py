"""Arguments and inputs every ``fipurify`` subcommand shares: the model (a fipurify file or
``--arch``/``--weights``), the data root, the device, ``KEY=VALUE`` options, the output path
check and the clean purification set. The command modules (:mod:`fipurify.cli`,
``analysis.commands``, ``detection.commands``) import them from here, below all of them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import FipurifyError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $FIPURIFY_DATA, then ../shared/data)")


def parse_key_values(items: Sequence[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict; each value is read as JSON, else kept as a string."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise FipurifyError(f"{flag} takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    from .devices import CHOICES_HELP
    p.add_argument("--device", default="auto", help=f"where to compute: {CHOICES_HELP} (default: %(default)s)")


def _device(args) -> str:
    """The checked device of ``args.device`` (a one-line error for an unusable one, before any compute)."""
    from .devices import resolve_device
    return resolve_device(getattr(args, "device", "cpu"))


def _add_model_args(p: argparse.ArgumentParser, what: str | None = "model") -> None:
    """The model to work on: a fipurify model file (``what``; None: no positional), or your own
    architecture + weights."""
    if what is None:
        p.set_defaults(model=None)
    else:
        p.add_argument("model", nargs="?", default=None,
                       help=f"the {what}: a fipurify .safetensors model file (from train, purify or import); "
                            "or leave it out and give --arch and --weights")
    p.add_argument("--arch", default=None, metavar="NAME",
                   help="your own model's architecture: a fipurify model name (preactresnet18, resnet18, "
                        "wideresnet16_1, vgg11, vit_small), package.module:factory (a model class or function "
                        "on PYTHONPATH), torchvision:NAME or timm:NAME (if installed) (default: none)")
    p.add_argument("--arch-args", default=None, metavar="JSON",
                   help="keyword arguments of --arch as a JSON object, e.g. '{\"num_classes\": 10, "
                        "\"width\": 16}' (default: none)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="your own model's weights: safetensors or torch.save(model.state_dict()) "
                        "(read with weights_only=True; never a pickled model) (default: none)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="your own model's class names in label order: a,b,c or a text file with one name "
                        "per line (default: the clean folder's sub-folder names, sorted)")
    p.add_argument("--dataset", dest="model_dataset", default=None, choices=["cifar10", "gtsrb"],
                   help="the dataset your own model was trained for, so its test set can evaluate it "
                        "(default: none)")
    _add_device_arg(p)


def _class_names(value: str | None) -> list[str] | None:
    if not value:
        return None
    path = Path(value)
    if path.is_file():  # one name per line
        names = [line.strip() for line in path.read_text().splitlines()]
    else:
        names = [c.strip() for c in value.split(",")]
    names = [n for n in names if n]
    if len(names) < 2 or len(set(names)) != len(names):
        raise FipurifyError(f"--classes needs two or more distinct names, got {value!r}")
    return names


def _dataset_facts(name: str) -> dict[str, Any]:
    """What a named dataset's model metadata records (as training does), without loading it."""
    from . import datasets

    info = datasets.dataset_info(name)
    classes = {"cifar10": datasets.CIFAR10_CLASSES, "gtsrb": datasets.GTSRB_CLASSES}[name]
    return {"name": name, "num_classes": info.num_classes, "classes": list(classes),
            "image_shape": [info.channels, info.image_size, info.image_size]}


def _open_model(args):
    """``(model, metadata)`` from a model file or from --arch/--weights (see :func:`_add_model_args`)."""
    from .io import open_model

    classes = _class_names(getattr(args, "classes", None))
    ds = getattr(args, "model_dataset", None)
    if args.model is not None and (classes or ds):
        raise FipurifyError("--classes and --dataset describe your own model (--arch/--weights); "
                            "a fipurify model file records them itself")
    device = _device(args)
    model, meta = open_model(args.model, args.arch, args.arch_args, args.weights, classes)
    model = model.to(device)
    if args.model is None and ds:
        meta["dataset"] = _dataset_facts(ds)
        if classes and len(classes) != meta["dataset"]["num_classes"]:
            raise FipurifyError(f"--classes names {len(classes)} classes, {ds} has {meta['dataset']['num_classes']}")
    return model, meta


def _model_label(args) -> str:
    return Path(args.model).name if args.model is not None else Path(args.weights).name


def _check_model_inputs(args) -> None:
    """Fail on a missing/directory model or weights file before anything else is read."""
    from .models.external import check_model_path

    for path in (args.model, getattr(args, "weights", None)):
        if path is not None:
            check_model_path(path)


def _check_out(args, path: str | None, flag: str = "--out") -> None:
    from .validation import check_output_path

    if path is not None:
        check_output_path(path, [getattr(args, "model", None), getattr(args, "weights", None)],
                          getattr(args, "mkdir", False), flag)


def _parse_options(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    out = parse_key_values(items, flag)
    return {k.replace("-", "_"): v for k, v in out.items()}


def _clean_set(args, model, meta: dict[str, Any]):
    """The clean purification set: a user's image folder, or N images from the model's clean reserve."""
    from . import datasets
    from .workflow import load_clean_folder, reload_data

    if args.clean_size is not None and args.clean_size < 1:
        raise FipurifyError(f"--clean-size must be at least 1, got {args.clean_size}")
    if args.clean_dir:  # image models only (see _check_task)
        data = load_clean_folder(model, meta, args.clean_dir,
                                 warn=lambda m: print(f"fipurify: warning: {m}", file=sys.stderr))
        where = f"the folder {args.clean_dir}"
    else:
        if not meta.get("clean_reserve"):
            raise FipurifyError(f"{_model_label(args)} records no clean reserve (it was not trained with "
                                "fipurify): pass --clean-dir FOLDER of clean images (FOLDER/<class>/*.png)")
        data = reload_data(meta, args.data_root).reserve
        where = "the model's clean reserve"
    n = args.clean_size if args.clean_size is not None else len(data)
    if n > len(data):
        raise FipurifyError(f"--clean-size {n} is more than the {len(data)} images in {where}")
    return datasets.draw_clean_subset(data, n, args.seed)
