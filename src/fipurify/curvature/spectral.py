"""f-FIP's spectral re-parametrisation: train only shifts of the singular values of each weight.

Every Conv (``out x in/groups x k...``, viewed as an ``out x (in/groups * prod(k))`` matrix)
and Linear (``out x in``) weight ``W = U diag(s) V^T`` is replaced, through
``torch.nn.utils.parametrize``, by ``U diag(relu(s + delta)) V^T`` with ``U, s, V`` from one
SVD (frozen buffers) and ``delta`` (zeros, one per singular value) the only new trainable
tensor (paper section 5.1). Biases and normalisation layers are left untouched here: which
of them train is the caller's decision.

Memory: the layer keeps ``U`` (out x k), ``s`` and ``V^T`` (k x rest), about the size of ``W``
plus ``k^2`` entries. The original weight is *not* kept: the parametrisation's
``right_inverse`` decomposes a weight and stores an empty placeholder as
``parametrizations.weight.original`` (frozen). Assigning ``module.weight = W2`` later
re-decomposes ``W2`` and resets ``delta`` to zero. :func:`fold_spectral` writes the
current weights back as ordinary parameters (the same ``Parameter`` objects as before
:func:`attach_spectral`, with their ``requires_grad`` and order restored), so the state-dict
keys are those of the original model.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Selector = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]


def _decompose(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD of ``weight`` viewed as ``out x rest``, done in float64, cast back."""
    device = weight.device
    # float64 is unsupported on some back-ends (e.g. Apple MPS): decompose on the CPU there.
    work_device = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    mat = weight.detach().reshape(weight.shape[0], -1).to(work_device, torch.float64)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return tuple(t.to(device, weight.dtype).contiguous() for t in (u, s, vh))  # type: ignore


class SpectralShift(nn.Module):
    """Parametrisation ``W = (U diag(relu(s + delta)) V^T).reshape(shape)``.

    ``U`` (out x k), ``s`` (k) and ``Vh`` (k x rest) are buffers; ``delta`` (k, zeros) is the
    only parameter, with ``k = min(out, rest)``. The incoming (original) tensor is ignored.
    """

    def __init__(self, U: Tensor, s: Tensor, Vh: Tensor, shape: Sequence[int]) -> None:
        super().__init__()
        shape = torch.Size(shape)
        k = s.numel()
        if U.shape != (shape[0], k) or Vh.shape != (k, math.prod(shape[1:])):
            raise ConfigError(f"SVD factors {tuple(U.shape)}, {tuple(s.shape)}, {tuple(Vh.shape)} "
                              f"do not fit a weight of shape {tuple(shape)}")
        self.register_buffer("U", U)
        self.register_buffer("s", s)
        self.register_buffer("Vh", Vh)
        self.delta = nn.Parameter(torch.zeros_like(s))
        self.shape = shape
        # Set by attach_spectral so fold_spectral can put the weight back as it was.
        self.original_requires_grad = True
        self.param_order: list[str] = []
        # register_parametrization calls right_inverse on the weight just decomposed by
        # from_weight; this flag spares a second SVD of the same matrix.
        self._factors_current = False

    @classmethod
    def from_weight(cls, weight: Tensor) -> "SpectralShift":
        """Decompose ``weight`` (float64 SVD on its device) into a zero-shift parametrisation."""
        shift = cls(*_decompose(weight), weight.shape)
        shift._factors_current = True
        return shift

    def forward(self, _original: Tensor) -> Tensor:
        sigma = torch.relu(self.s + self.delta)
        return ((self.U * sigma) @ self.Vh).reshape(self.shape)

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> Tensor:
        """Re-decompose ``weight``, reset ``delta`` to 0; return an empty placeholder.

        ``parametrize`` stores what this returns as ``original``; the forward pass does not
        need it, so an empty tensor avoids keeping a second copy of every weight.
        """
        if weight.shape != self.shape:
            raise ConfigError(f"cannot assign a weight of shape {tuple(weight.shape)} to a layer "
                              f"of shape {tuple(self.shape)}")
        if not self._factors_current:
            u, s, vh = _decompose(weight)
            self.U.copy_(u)
            self.s.copy_(s)
            self.Vh.copy_(vh)
            self.delta.zero_()
        self._factors_current = False
        return weight.new_empty(0)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, rank={self.s.numel()}"


def _selector(sel: Selector, default: bool) -> Callable[[str, nn.Module], bool]:
    """Turn a glob pattern, a list of patterns or a callable into a predicate."""
    if sel is None:
        return lambda name, module: default
    if callable(sel):
        return sel
    patterns = [sel] if isinstance(sel, str) else list(sel)
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError("include/exclude must be glob patterns (str), a list of them, or a callable")
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _spectral_of(module: nn.Module) -> SpectralShift | None:
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:  # type: ignore[union-attr]
            if isinstance(p, SpectralShift):
                return p
    return None


def attach_spectral(model: nn.Module, include: Selector = None, exclude: Selector = None,
                    min_size: int = 1) -> list[tuple[str, SpectralShift]]:
    """Re-parametrise every Conv1d/2d/3d and Linear weight of ``model`` in place.

    Args:
        model: the model; modified in place.
        include: module-name glob pattern(s) (``fnmatch``, e.g. ``"layer4.*"``) or a callable
            ``(name, module) -> bool``; only matching layers are re-parametrised (default all).
        exclude: same forms; matching layers are skipped.
        min_size: skip weights with fewer elements than this.

    Returns:
        ``(module name, SpectralShift)`` for each re-parametrised layer, in module order.

    Raises:
        ConfigError: no layer matched, or a matched weight is already parametrised.
    """
    inc, exc = _selector(include, True), _selector(exclude, False)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        if not inc(name, module) or exc(name, module):
            continue
        if parametrize.is_parametrized(module, "weight"):
            raise ConfigError(f"layer {name or '<model>'} is already re-parametrised; "
                              "fold it first")
        if not isinstance(module.weight, nn.Parameter):
            raise ConfigError(f"layer {name or '<model>'} has no weight parameter to re-parametrise")
        if module.weight.numel() < min_size:
            continue
        chosen.append((name, module))
    if not chosen:
        raise ConfigError("model has no Conv or Linear layer to re-parametrise"
                          + (" (after include/exclude/min_size)" if include or exclude or min_size > 1
                             else ""))
    attached = []
    for name, module in chosen:
        weight = module.weight
        shift = SpectralShift.from_weight(weight)
        shift.original_requires_grad = weight.requires_grad
        shift.param_order = list(module._parameters)
        weight.requires_grad_(False)
        parametrize.register_parametrization(module, "weight", shift)
        attached.append((name, shift))
    return attached


def spectral_layers(model: nn.Module) -> list[tuple[str, SpectralShift]]:
    """``(module name, SpectralShift)`` for every re-parametrised layer, in module order."""
    found = []
    for name, module in model.named_modules():
        shift = _spectral_of(module)
        if shift is not None:
            found.append((name, shift))
    return found


def spectral_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable singular-value shifts ``delta`` of every re-parametrised layer."""
    return [shift.delta for _, shift in spectral_layers(model)]


@torch.no_grad()
def fold_spectral(model: nn.Module) -> nn.Module:
    """Write ``U diag(relu(s + delta)) V^T`` back as plain weights and drop the parametrisation.

    The weights become ordinary ``nn.Parameter`` objects again (the very objects the model
    had before :func:`attach_spectral`, so optimiser references stay valid), with their
    original ``requires_grad`` and parameter order; ``model.state_dict()`` then has the
    keys, in the same order, of the model before attachment. A layer's whole stack of
    parametrisations on ``weight`` is folded. Returns ``model`` (modified in place).
    """
    for _, module in model.named_modules():
        shift = _spectral_of(module)
        if shift is None:
            continue
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight.requires_grad_(shift.original_requires_grad)
        # remove_parametrizations re-registers the weight last; restore the original order.
        params = module._parameters
        order = [k for k in shift.param_order if k in params]
        order += [k for k in params if k not in order]
        reordered = {k: params[k] for k in order}
        params.clear()
        params.update(reordered)
    return model
