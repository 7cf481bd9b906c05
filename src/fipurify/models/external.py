"""Models named by a spec string, and weights read from a user's file, never via pickle.

A model spec is one of

* a name from our registry (``preactresnet18``, ... see :func:`fipurify.models.available`);
* ``package.module:factory`` - a class (an ``nn.Module`` subclass) or function that builds
  the model, called with the JSON arguments; the module is imported, nothing is unpickled;
* ``torchvision:NAME`` / ``timm:NAME`` - a model of those optional packages.

:func:`build` makes the model and sets ``model.fipurify_spec`` so that
:func:`fipurify.save_model` can record it and :func:`fipurify.load_model` rebuild it.
:func:`load_weights` reads a safetensors file or a ``torch.save``'d state dict with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError, ModelFileError

#: Top-level packages never accepted as model factories (a model file names its factory,
#: so a hostile file must not be able to name e.g. an installer's entry point).
_NOT_MODELS = ("builtins", "pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel", "pytest",
               "_pytest", "IPython")

#: Packages whose model names are accepted as ``PACKAGE:NAME`` (optional, not dependencies).
OPTIONAL_ZOOS = ("torchvision", "timm")


def is_registry_name(spec: str) -> bool:
    from .registry import canonical_name

    try:
        canonical_name(spec)
        return True
    except ConfigError:
        return False


def parse_arch_args(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--arch-args`` as a dict: a JSON object (or already a mapping, or None)."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--arch-args must be a JSON object such as '{{\"num_classes\": 10}}', "
                          f"got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--arch-args must be a JSON object such as '{{\"num_classes\": 10}}', got {text!r}")
    return value


def _zoo_factory(package: str, name: str) -> Callable[..., nn.Module]:
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"--arch {package}:{name} needs the optional package {package}, which is not "
                          f"installed (pip install {package})") from None
    if package == "timm":
        if name not in mod.list_models():
            raise ConfigError(f"timm has no model {name!r}")
        return lambda **kw: mod.create_model(name, **kw)
    models = importlib.import_module("torchvision.models")
    if name not in models.list_models():
        raise ConfigError(f"torchvision has no model {name!r}")
    return lambda **kw: models.get_model(name, **kw)


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    """``module:attr`` imported (never unpickled) and checked to be a model class or a Python function.

    Builtins and functions of the standard library are refused, so a model file cannot name
    e.g. ``os:system`` as its "factory".
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--arch {spec!r}: expected a registry name or package.module:factory")
    top = module_name.split(".")[0]
    if top in getattr(sys, "stdlib_module_names", ()) or top in _NOT_MODELS \
            or (top == "fipurify" and not module_name.startswith("fipurify.models")):
        raise ConfigError(f"--arch {spec!r}: a factory from {top} is not a model")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--arch {spec!r}: cannot import {module_name} ({e}); "
                          "put its folder on PYTHONPATH or install its package") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--arch {spec!r}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise ConfigError(f"--arch {spec!r}: {attr} is a class but not a torch.nn.Module")
    elif not inspect.isfunction(obj):
        raise ConfigError(f"--arch {spec!r}: {attr} is neither a model class nor a Python function")
    elif obj.__module__ != module_name:  # defined there, not re-exported from elsewhere
        raise ConfigError(f"--arch {spec!r}: {attr} is defined in {obj.__module__}, not in {module_name}")
    return obj


def factory(spec: str) -> Callable[..., nn.Module]:
    """The callable that builds ``spec`` (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--arch must name a model, got {spec!r}")
    spec = spec.strip()
    if is_registry_name(spec):
        from .registry import create
        return lambda **kw: create(spec, **kw)
    package, sep, name = spec.partition(":")
    if sep and package in OPTIONAL_ZOOS:
        return _zoo_factory(package, name)
    if not sep:
        from .registry import available
        raise ConfigError(f"unknown model {spec!r}; use one of {', '.join(available())}, "
                          "package.module:factory, torchvision:NAME or timm:NAME")
    return _import_factory(spec)


def build(spec: str, args: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the model ``spec`` with keyword ``args``; it carries ``fipurify_spec`` for saving."""
    args = dict(args or {})
    make = factory(spec)
    try:
        model = make(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {spec} with arguments {json.dumps(args, default=repr)}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if getattr(model, "fipurify_spec", None) is None:  # registry models set their own (defaults filled in)
        model.fipurify_spec = {"arch": spec.strip(), "kwargs": args}
    return model


def infer_spec(model: nn.Module) -> dict[str, Any] | None:
    """``{"arch": "module:Class", "kwargs": {}}`` when the model's class is importable and builds without
    arguments into the same state-dict layout; else None."""
    cls = type(model)
    if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
        return None
    spec = f"{cls.__module__}:{cls.__qualname__}"
    try:
        fresh = build(spec, {})
    except Exception:
        return None
    from .bounded import bounded_channels

    bound_keys = {f"{name}.bound" for name in bounded_channels(model)}  # saved apart (fipurify.io)
    mine = {k: v for k, v in model.state_dict().items() if k not in bound_keys}
    theirs = fresh.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        return None
    return {"arch": spec, "kwargs": {}}


# --------------------------------------------------------------------------- weights
def sniff(path: Path) -> str:
    """'safetensors', 'torch-zip' (torch.save), 'pickle' (legacy torch.save or pickle), or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    # safetensors first: its 8-byte header length may start with 0x80 (a header of 128 + 256k bytes)
    if len(head) == 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= 100_000_000:
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+ (legacy torch.save, plain pickle)
        return "pickle"
    return "unknown"


def check_model_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a readable file; one-line ModelFileError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a model file")
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    return path


def _only_tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        raise ModelFileError(f"{path} holds a whole pickled model; save its weights instead: "
                             "torch.save(model.state_dict(), PATH)")
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):  # common checkpoint layouts
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
    raise ModelFileError(f"{path} is not a state dict (name -> tensor); save it with "
                         "torch.save(model.state_dict(), PATH)")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: safetensors, or ``torch.save(model.state_dict())`` read with
    ``weights_only=True``. A pickled module, a truncated file or anything else: ModelFileError."""
    path = check_model_path(path)
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ModelFileError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None
    if kind in ("torch-zip", "pickle"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for globals weights_only refuses; RuntimeError when cut short
            msg = str(e)
            if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
                raise ModelFileError(f"{path} holds pickled Python objects (such as a whole model), which "
                                     "fipurify never unpickles; save the weights instead: "
                                     "torch.save(model.state_dict(), PATH)") from None
            first = msg.split(". ")[0].splitlines()[0] if msg else type(e).__name__
            raise ModelFileError(f"{path}: truncated or corrupt PyTorch file ({first})") from None
        return _only_tensors(obj, path)
    raise ModelFileError(f"{path} is neither a safetensors file nor a PyTorch state dict (torch.save)")


def fit_weights(model: nn.Module, state: Mapping[str, torch.Tensor], label: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly (a ``module.`` prefix from DataParallel is dropped)."""
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in model.state_dict()):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        parts = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) \
            + ([f"{len(extra)} unexpected ({few(extra)})"] if extra else []) \
            + [f"{k} is {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model" for k in shapes[:2]]
        raise ModelFileError(f"weights in {label} do not fit the architecture: {'; '.join(parts)} "
                             "(check --arch and --arch-args)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"weights in {label} do not fit the architecture: {str(e).splitlines()[0]}") from None
    return model


__all__ = ["OPTIONAL_ZOOS", "build", "factory", "fit_weights", "infer_spec", "is_registry_name",
           "load_weights", "parse_arch_args", "sniff", "check_model_path"]
