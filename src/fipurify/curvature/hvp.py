"""Matrix-free Hessian-vector products of the mean cross-entropy loss.

``H = d^2/dtheta^2 mean_i CE(model(x_i), y_i)`` over a fixed sample, with respect to a
chosen list of parameters, applied to flat vectors. Two back-ends, both plain PyTorch:

* ``"autograd"`` (default): double back-propagation. The gradient is taken once with
  ``create_graph=True`` and kept (per batch, when ``cache_graph``); each product is then
  one backward pass through that graph. Fastest when many products are taken on the
  same sample (power iteration, Lanczos, Hutchinson), at the price of keeping the
  gradient graph in memory.
* ``"func"``: forward-over-reverse, ``torch.func.jvp(torch.func.grad(loss))``; keeps no
  graph between products (each product re-runs the forward and backward pass).

See docs/hessian-backends.md for the accuracy and speed comparison that chose the default.
The model runs in eval mode (BatchNorm on running statistics) for every product.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from ..errors import ConfigError
from .mode import analysis_mode

#: One ``(inputs, labels)`` batch of the fixed sample the operator is defined on.
Batch = tuple[Tensor, Tensor]


def count(batches: list[Batch]) -> int:
    """Number of examples in ``batches``."""
    return sum(len(x) for x, _ in batches)

BACKENDS = ("autograd", "func")
LossFn = Callable[[Tensor, Tensor], Tensor]


def _param_names(model: nn.Module, params: Sequence[Tensor]) -> list[str]:
    by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ConfigError("every analysed tensor must be a parameter of the model "
                          f"({len(missing)} of {len(params)} are not)")
    return [by_id[id(p)] for p in params]


class HessianOperator:
    """The loss Hessian over ``batches`` with respect to ``params``, as a linear operator.

    Args:
        model: maps a batch of inputs to logits.
        batches: the fixed sample, a list of ``(x, y)`` on the model's device.
        params: parameters of ``model`` (the Hessian's coordinates, in this order).
        backend: ``"autograd"`` or ``"func"`` (see the module docstring).
        cache_graph: ``"autograd"`` only: keep each batch's gradient graph between
            products (default: when the sample is a single batch).
        loss: ``loss(logits, y) -> scalar`` (default mean cross-entropy).

    The model must not change while the operator is used: a cached graph refers to the
    weights it was built with (autograd raises if they were modified in place).
    """

    def __init__(self, model: nn.Module, batches: list[Batch], params: Sequence[Tensor],
                 backend: str = "autograd", cache_graph: bool | None = None,
                 loss: LossFn | None = None) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown Hessian back-end {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.params = list(params)
        if not self.params:
            raise ConfigError("no parameters to analyse")
        self.names = _param_names(model, self.params)
        self.model, self.batches, self.backend = model, batches, backend
        self.loss = loss or F.cross_entropy
        self.n_examples = count(batches)
        self.dim = int(sum(p.numel() for p in self.params))
        self.cache_graph = (len(batches) == 1) if cache_graph is None else bool(cache_graph)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.n_products = 0
        self._graphs: list[tuple[Tensor, ...] | None] = [None] * len(batches)

    # -- flat <-> per-parameter --------------------------------------------------------
    def split(self, v: Tensor) -> list[Tensor]:
        """A flat vector as tensors shaped like ``params`` (in their dtype and device)."""
        if v.shape != (self.dim,):
            raise ConfigError(f"vector has shape {tuple(v.shape)}, the operator works on ({self.dim},)")
        v = v.to(self.device, self.dtype)
        return [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in self.params]), self.params)]

    @staticmethod
    def flatten(parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in parts])

    # -- products ----------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (returned in ``v``'s dtype and device)."""
        vs = self.split(v)
        total = [torch.zeros_like(p) for p in self.params]
        with analysis_mode(self.model, self.params):
            for i, (x, y) in enumerate(self.batches):
                hv = self._autograd(i, x, y, vs) if self.backend == "autograd" else self._func(x, y, vs)
                w = len(x) / self.n_examples  # the mean loss over all batches
                for t, h in zip(total, hv):
                    if h is not None:
                        t.add_(h.detach(), alpha=w)
        self.n_products += 1
        return self.flatten(total).to(v.device, v.dtype)

    __matmul__ = matvec

    def loss_value(self) -> float:
        """The mean loss over the sample (eval mode)."""
        with torch.no_grad(), analysis_mode(self.model, []):
            s = sum(float(self.loss(self.model(x), y)) * len(x) for x, y in self.batches)
        return s / self.n_examples

    def gradient(self) -> Tensor:
        """The flat loss gradient over the sample."""
        total = [torch.zeros_like(p) for p in self.params]
        with analysis_mode(self.model, self.params):
            for x, y in self.batches:
                g = torch.autograd.grad(self.loss(self.model(x), y), self.params, allow_unused=True)
                for t, gi in zip(total, g):
                    if gi is not None:
                        t.add_(gi, alpha=len(x) / self.n_examples)
        return self.flatten(total)

    def _autograd(self, i: int, x: Tensor, y: Tensor, vs: list[Tensor]) -> Sequence[Tensor | None]:
        g = self._graphs[i]
        if g is None:
            g = torch.autograd.grad(self.loss(self.model(x), y), self.params, create_graph=True,
                                    allow_unused=True)
            if self.cache_graph:
                self._graphs[i] = g
        # A gradient that does not depend on the parameters (a linear loss term) has no
        # graph: its Hessian block is zero.
        keep = [j for j, gj in enumerate(g) if gj is not None and gj.requires_grad]
        out: list[Tensor | None] = [None] * len(self.params)
        if keep:
            hv = torch.autograd.grad([g[j] for j in keep], self.params, grad_outputs=[vs[j] for j in keep],
                                     retain_graph=self.cache_graph, allow_unused=True)
            out = list(hv)
        return out

    def _func(self, x: Tensor, y: Tensor, vs: list[Tensor]) -> Sequence[Tensor]:
        names = self.names

        def loss_of(ps: tuple[Tensor, ...]) -> Tensor:
            return self.loss(functional_call(self.model, dict(zip(names, ps)), (x,)), y)

        primals = tuple(p.detach() for p in self.params)
        _, hv = jvp(grad(loss_of), (primals,), (tuple(vs),))
        return hv

    def release(self) -> None:
        """Drop the cached gradient graphs (frees their memory)."""
        self._graphs = [None] * len(self.batches)

    def dense(self) -> Tensor:
        """The full ``dim x dim`` Hessian, one product per column (small models only)."""
        if self.dim > 20000:
            raise ConfigError(f"refusing to build a dense {self.dim} x {self.dim} Hessian")
        eye = torch.eye(self.dim, dtype=torch.float64)
        return torch.stack([self.matvec(eye[i]) for i in range(self.dim)], dim=1)
