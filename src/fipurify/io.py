"""Saving and loading models as safetensors plus JSON metadata, never via pickle.

A fipurify model file is an ordinary ``.safetensors`` file. Its header metadata holds
one JSON document under the key ``"fipurify"`` with the architecture and its
arguments (so the model can be rebuilt, with the activation modules that carry bounds, if any:
:mod:`fipurify.models.bounded`), the caller's metadata (dataset, attack,
seed, clean-reserve digest, ...), and a SHA-256 digest of all tensors so that a
tampered file is refused. Writes are atomic: a crash never leaves half a file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import torch
from torch import nn

from .errors import ConfigError, ModelFileError

FORMAT = "fipurify-model/1"
_KEY = "fipurify"


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict, in sorted key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (briefly process-wide)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` only on success.

    A crash or exception inside the block leaves neither a partial ``path`` nor the
    temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would (umask applied).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_output(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (UTF-8); see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_model(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save ``model`` and JSON-serialisable ``metadata`` to a safetensors file, atomically.

    The architecture is recorded so :func:`load_model` can rebuild it: the model's
    ``fipurify_spec`` (set by :func:`fipurify.models.create` and
    :func:`fipurify.models.external.build`), else ``metadata["arch"]`` (a registry name,
    ``package.module:factory``, ``torchvision:NAME`` or ``timm:NAME``) with
    ``metadata["arch_kwargs"]``, else the model's own class when it is importable and
    builds without arguments.
    """
    from safetensors.torch import save

    from .models.bounded import bounded_channels
    from .models.external import infer_spec

    meta = dict(metadata or {})
    spec = getattr(model, "fipurify_spec", None)
    if spec is None and "arch" in meta:
        spec = {"arch": meta.pop("arch"), "kwargs": meta.pop("arch_kwargs", {})}
    if spec is None:
        spec = infer_spec(model)
    if spec is None:
        raise ModelFileError(f"cannot save a {type(model).__name__} without an architecture spec: pass "
                             "metadata={'arch': 'package.module:factory', 'arch_kwargs': {...}} (an importable "
                             "class or function that builds it), or build it with fipurify.models.external.build")
    state = _plain_state(model)
    doc = {"format": FORMAT, "arch": spec["arch"], "arch_kwargs": spec["kwargs"],
           "metadata": meta, "tensors_sha256": tensors_digest(state)}
    if bounds := bounded_channels(model):  # activation bounds (activation clipping): rebuilt on load
        doc["activation_bounds"] = bounds
    try:
        header = {_KEY: json.dumps(doc, sort_keys=True)}
    except TypeError as e:
        raise ModelFileError(f"metadata is not JSON-serialisable: {e}") from None
    return atomic_write_bytes(path, save(state, metadata=header))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The fipurify JSON document of a model file, without loading the tensors."""
    from safetensors import safe_open

    from .models.external import check_model_path, sniff

    path = check_model_path(path)
    kind = sniff(path)
    if kind in ("torch-zip", "pickle"):
        raise ModelFileError(f"{path} is not a safetensors file but a PyTorch file: give it as --arch NAME "
                             f"--weights {path.name} (or wrap it once: fipurify import --arch NAME --weights "
                             f"{path.name} --out MODEL.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors input
        if kind == "safetensors":
            raise ModelFileError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None
        raise ModelFileError(f"{path} is not a safetensors file ({type(e).__name__}: {e})") from None
    if _KEY not in header:
        raise ModelFileError(f"{path} is a safetensors file but not a fipurify model (no '{_KEY}' metadata): "
                             f"give it as --arch NAME --weights {path.name}, or wrap it once with "
                             "fipurify import --arch NAME --weights FILE --out MODEL.safetensors")
    try:
        doc = json.loads(header[_KEY])
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: corrupt fipurify metadata ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"{path}: unsupported model format {doc.get('format') if isinstance(doc, dict) else doc!r}")
    return doc


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a model saved by :func:`save_model`; returns ``(model, metadata)`` with the model in eval mode.

    Raises :class:`ModelFileError` for anything that is not an untampered fipurify file.
    """
    from safetensors.torch import load_file

    from .models import external
    from .models.bounded import insert_bounds

    doc = read_metadata(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise ModelFileError(f"{path}: truncated or corrupt tensor data ({type(e).__name__}: {e})") from None
    if tensors_digest(state) != doc.get("tensors_sha256"):
        raise ModelFileError(f"{path}: tensor checksum mismatch - the file was modified after it was saved")
    try:  # a registry name, or an importable module:factory (imported, never unpickled)
        model = external.build(doc["arch"], doc["arch_kwargs"])
    except Exception as e:
        raise ModelFileError(f"{path}: cannot rebuild architecture {doc.get('arch')!r}: {e}") from None
    try:
        bounds = doc.get("activation_bounds") or {}
        if not isinstance(bounds, dict) or not all(isinstance(v, int) and v > 0 for v in bounds.values()):
            raise ConfigError(f"malformed activation_bounds {bounds!r}")
        insert_bounds(model, bounds)
    except ConfigError as e:
        raise ModelFileError(f"{path}: cannot put its activation bounds on {doc['arch']!r}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not fit architecture {doc['arch']!r}: "
                             f"{str(e).splitlines()[0]}") from None
    meta = dict(doc.get("metadata", {}))
    meta.setdefault("arch", doc["arch"])
    meta.setdefault("arch_kwargs", doc["arch_kwargs"])
    return model.to(map_location).eval(), meta


def open_model(path: str | os.PathLike | None = None, arch: str | None = None,
               arch_args: str | Mapping[str, Any] | None = None, weights: str | os.PathLike | None = None,
               classes: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A fipurify model file (``path``) or a user's model (``arch`` + ``weights``), as ``(model, metadata)``.

    A user's model has no dataset in its metadata unless ``classes`` names its classes.
    """
    if path is not None and (arch or weights):
        raise ConfigError("give either a fipurify model file or --arch with --weights, not both")
    if path is not None:
        if arch_args:
            raise ConfigError("--arch-args needs --arch")
        return load_model(path)
    if not arch or not weights:
        raise ConfigError("name the model: a fipurify model file, or --arch NAME --weights FILE "
                          "(safetensors or torch.save(model.state_dict()))")
    from .models.external import build, fit_weights, load_weights, parse_arch_args

    state = load_weights(weights)  # before building: a bad file fails fast
    model = fit_weights(build(arch, parse_arch_args(arch_args)), state, str(weights))
    meta: dict[str, Any] = {"arch": model.fipurify_spec["arch"], "arch_kwargs": model.fipurify_spec["kwargs"],
                            "imported_from": Path(weights).name}
    if classes:
        meta["classes"] = list(classes)
    return model.eval(), meta
