"""Run a model for curvature analysis: eval mode, gradients only where asked, everything put back."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import Tensor, nn


@contextlib.contextmanager
def analysis_mode(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """``model.eval()`` and ``requires_grad`` on exactly ``params`` for the block.

    Eval mode: BatchNorm uses its running statistics (examples independent, nothing
    updated) and dropout is off, so the loss is a fixed function of the parameters. Only
    ``params`` require grad, so autograd builds no graph for the others (faster). Every
    module's ``training`` flag and every parameter's ``requires_grad`` are restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(p) for p in params}
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, rg in flags:
            p.requires_grad_(rg)
