"""What the FIP authors' released purification script runs, as a configuration of our code.

The paper (Karim et al., CCS 2024, eq. 9) minimises ``CE + eta_F Tr(F) + eta_r/2 L_r``. The
authors' public script (nazmul-karim170/FIP-Fisher-Backdoor-Removal, ``src/Remove_Backdoor_FIP.py``
with ``src/Regularizer.py``; read for reference, not copied) differs in regime and objective:

* **regime** (:data:`RELEASED_REGIME`): every weight is fine-tuned with SGD, lr 0.005, momentum
  0.95, no weight decay, batch 128, random crop + flip, BatchNorm in train mode, for 2,000
  iterations drawn *with replacement* from the 1 % clean split (4 rounds of 500; about 500 passes
  over 500 images, against the paper appendix's 50 epochs of 4 steps);
* **objective**: ``CE + eta_F * N`` every 5th iteration, with no Fisher anchor (L_r is computed
  but commented out; the SVD layers are never used). ``N`` (:func:`released_trace_term`) is

      N = 1/K sum_{k=1..K} sum_{j=1..L} sum_{l<=j} <g_l, v_{k,l}>,   v ~ N(0, I),  K = 20,

  where ``g = grad_theta mean_{i,j} log p(y_j | x_i)`` (the script indexes ``log_softmax(out)[:, y]``,
  a B x B matrix, so every image is scored against every label of the batch) and the inner sum
  over layers is cumulative (the script appends the running sum after each of the L parameter
  tensors). ``N`` is linear in the random vectors: its expectation is zero, and its gradient
  ``1/K sum_k H_ll (sum_l (L - l + 1) v_{k,l})`` is a Hessian-vector product with random
  directions, i.e. gradient noise shaped by the curvature of the log-likelihood, not the
  gradient of Tr(F) (whose estimators square the score). The authors advise eta_F <= 0.005 to
  users who got poor results with the default 0.5 (issue 2 of that repository).

Registered as ``fip-released`` (the script's objective in its regime, eta_F = 0.5 as its
default); :data:`RELEASED_REGIME` is the regime alone, to run FT, FIP or f-FIP under it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: The optimisation regime of the released script (all defense options of :class:`DefenseConfig`):
#: 4 x 500 = 2,000 iterations with replacement, SGD lr 0.005 momentum 0.95, no weight decay, no
#: LR decay, batch 128, crop + flip, BatchNorm in train mode.
RELEASED_REGIME: dict[str, Any] = {"epochs": 4, "steps_per_epoch": 500, "lr": 0.005, "momentum": 0.95,
                                   "weight_decay": 0.0, "milestones": (), "batch_size": 128,
                                   "augment": True, "flip": True, "bn_mode": "train"}

#: The released script's objective: its noise term every 5th iteration, no anchor, all weights.
RELEASED_OBJECTIVE: dict[str, Any] = {"space": "weights", "trace": "released", "fisher_every": 5,
                                      "eta_f": 0.5, "eta_r": 0.0}

#: Gaussian vectors per evaluation of the term (the script's ``hi=20``).
N_VECTORS = 20


def released_trace_term(logits: Tensor, y: Tensor, params: Sequence[Tensor], n_vectors: int = N_VECTORS,
                        generator: torch.Generator | None = None) -> Tensor:
    """The released script's "trace" term ``N`` (module docstring) on one batch, differentiable.

    ``logits`` must come from a forward pass that built a graph through ``params`` (the script
    reuses the CE forward pass). The random vectors come from ``generator`` (on the CPU, then
    moved), so a seeded run is reproducible.
    """
    logp = F.log_softmax(logits, dim=1)
    mean_ll = logp[:, y].mean()  # B x B: every image against every label of the batch, as the script does
    grads = torch.autograd.grad(mean_ll, list(params), create_graph=True)
    total = logits.new_zeros(())
    for _ in range(n_vectors):
        running = logits.new_zeros(())
        for g in grads:
            v = torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)
            running = running + (g * v).sum()
            total = total + running  # cumulative over layers, as the script appends inside its loop
    return total / n_vectors
