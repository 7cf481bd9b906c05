"""Sharpness-aware minimisation (SAM, Foret et al., ICLR 2021) around any base optimizer.

One SAM update on a batch is two gradient evaluations::

    loss(model(x)).backward(); sam.first_step()     # climb to w + e, ||e|| = rho
    loss(model(x)).backward(); sam.second_step()    # back to w, step with the gradient at w + e

``e = rho * g / ||g||`` (all parameters together). With ``adaptive=True`` it is ASAM
(Kwon et al., ICML 2021): ``e = rho * T^2 g / ||T g||`` with ``T = |w|``, so the
neighbourhood scales with each weight and ``||e / |w| || = rho``.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import ConfigError


class SAM:
    """Wrap ``base`` (already built over ``params``) with SAM's perturb-then-step update."""

    def __init__(self, params: Iterable[torch.Tensor], base: torch.optim.Optimizer, rho: float = 0.05,
                 adaptive: bool = False, eps: float = 1e-12):
        if not rho > 0:
            raise ConfigError(f"SAM rho must be positive, got {rho}")
        self.params = [p for p in params if p.requires_grad]
        self.base = base
        self.rho = float(rho)
        self.adaptive = adaptive
        self.eps = eps
        self._saved: list[torch.Tensor] | None = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def _scaled_grads(self) -> list[torch.Tensor | None]:
        return [None if p.grad is None else (p.abs() * p.grad if self.adaptive else p.grad) for p in self.params]

    @torch.no_grad()
    def first_step(self) -> float:
        """Move every parameter to ``w + e`` (the ascent point); returns ``||g||`` (``||T g||`` for ASAM)."""
        if self._saved is not None:
            raise RuntimeError("SAM.first_step called twice without second_step")
        scaled = self._scaled_grads()
        norms = [g.norm(2) for g in scaled if g is not None]
        gnorm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        scale = self.rho / (gnorm + self.eps)
        self._saved = [p.detach().clone() for p in self.params]  # restored exactly in second_step
        for p, g in zip(self.params, scaled):
            if g is None:
                continue
            e = g * scale
            if self.adaptive:
                e = e * p.abs()  # T^2 g / ||T g|| * rho, with T g already in g
            p.add_(e)
        return float(gnorm)

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore ``w`` and apply the base optimizer with the gradient taken at ``w + e``."""
        if self._saved is None:
            raise RuntimeError("SAM.second_step called before first_step")
        for p, w in zip(self.params, self._saved):
            p.copy_(w)
        self._saved = None
        self.base.step()
