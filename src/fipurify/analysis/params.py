"""Which parameters the curvature is taken over: all weights, f-FIP's spectral shifts, or a list.

``"spectral"`` measures the Hessian with respect to the singular-value shifts ``delta``
that f-FIP trains (paper section 5.1): every Conv/Linear weight is re-parametrised as
``U diag(relu(s + delta)) V^T`` at ``delta = 0`` for the duration, then folded back and
the original weight values restored bit for bit, so the model is left as it was.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..curvature.spectral import attach_spectral, fold_spectral, spectral_layers
from ..errors import ConfigError

ParamSpec = Union[str, Sequence[Tensor], None]
SPECS = ("all", "spectral")


def plain_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or a folded copy when it carries spectral parametrisations.

    Mid-way through f-FIP the Conv/Linear weights are not parameters (the shifts are);
    a folded copy has ordinary weights again, so "all parameters" means what it says.
    The original model is not touched.
    """
    if not spectral_layers(model):
        return model
    clone = copy.deepcopy(model)
    _own_classes(clone)
    return fold_spectral(clone)


def _own_classes(model: nn.Module) -> None:
    """Give every parametrised module of a deep copy a parametrised class of its own.

    ``torch.nn.utils.parametrize`` injects one class per module, holding the ``weight``
    property; ``copy.deepcopy`` shares that class between original and copy, and removing
    the parametrisation from the copy would delete the property from the original too.
    """
    for m in model.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            ns = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, ns)


@contextlib.contextmanager
def spectral_view(model: nn.Module, include=None, exclude=None) -> Iterator[list[Tensor]]:
    """Yield f-FIP's shifts ``delta`` (zeros) of ``model``; leave ``model`` unchanged afterwards.

    A model already re-parametrised (during f-FIP) is used as it is: its own shifts are
    yielded and nothing is attached or folded.
    """
    existing = spectral_layers(model)
    if existing:
        yield [shift.delta for _, shift in existing]
        return
    saved = {id(p): p.detach().clone() for p in model.parameters()}
    attach_spectral(model, include=include, exclude=exclude)
    try:
        yield [shift.delta for _, shift in spectral_layers(model)]
    finally:
        fold_spectral(model)
        # Folding rebuilds W from its SVD (exact only up to rounding): put the values back.
        with torch.no_grad():
            for p in model.parameters():
                if id(p) in saved:
                    p.copy_(saved[id(p)])


@contextlib.contextmanager
def resolve(model: nn.Module, params: ParamSpec = "all") -> Iterator[tuple[nn.Module, list[Tensor]]]:
    """``(model to run, parameter list)`` for ``params`` = ``"all"``, ``"spectral"`` or a list.

    ``"all"``: every non-empty parameter (of a folded copy, see :func:`plain_model`).
    A list: those tensors, which must be parameters of ``model``.
    """
    if params is None or (isinstance(params, str) and params == "all"):
        m = plain_model(model)
        yield m, [p for p in m.parameters() if p.numel() > 0]
    elif isinstance(params, str) and params == "spectral":
        with spectral_view(model) as deltas:
            yield model, deltas
    elif isinstance(params, str):
        raise ConfigError(f"params must be one of {', '.join(SPECS)} or a list of parameters, got {params!r}")
    else:
        plist = list(params)
        if not plist or not all(isinstance(p, Tensor) for p in plist):
            raise ConfigError("params must be a non-empty list of the model's parameters")
        yield model, plist
