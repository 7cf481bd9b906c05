"""MM-BD's data-free maximum-margin statistic on cached models (docs/detection.md, "Tried and dropped").

    OMP_NUM_THREADS=1 python benchmarks/mmbd_probe.py MODEL [MODEL ...] [--starts 30] [--steps 300] [--seed 0]

MM-BD (Wang et al., IEEE S&P 2024; github.com/wanghangpsu/MM-BD ``univ_bd.py``, read, not copied):
for each class ``t``, images drawn uniformly from [0, 1] (``--starts`` of them) follow the gradient of
the margin ``logit_t - max_{j != t} logit_j`` (plain gradient steps of 0.01 on the pixels, clamped to
[0, 1] in the forward pass, ``--steps`` at most, stopped early when the summed margin changes by less
than 1e-5 relatively); the class's statistic is the largest margin reached. A Gamma distribution
fitted to the other classes' statistics gives the p-value ``1 - F(max)^K`` of the largest one; the
model is flagged below 0.05. No clean data is used. About 9 - 13 minutes per CIFAR-10 CPU-preset
model on one loaded CPU thread. Prints one JSON line per model (the attack from its metadata, for
reading only).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fipurify.io import load_model


def _margins(out: torch.Tensor, t: int) -> torch.Tensor:
    """Per image: logit of class ``t`` minus the largest other logit."""
    others = out.clone()
    others[:, t] = -torch.inf
    return out[:, t] - others.max(1).values


def max_margins(model: torch.nn.Module, classes: int, shape: tuple[int, ...], starts: int, steps: int,
                seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    stats = []
    for t in range(classes):
        x = torch.rand(starts, *shape, generator=g).requires_grad_(True)
        last = None
        for _ in range(steps):
            loss = -_margins(model(x.clamp(0, 1)), t).sum()
            grad, = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x -= 0.01 * grad
            if last is not None and abs(last - loss.item()) / abs(last) < 1e-5:
                break
            last = loss.item()
        with torch.no_grad():
            stats.append(float(_margins(model(x.clamp(0, 1)), t).max()))
    return stats


def gamma_p_value(stats: list[float]) -> tuple[int, float]:
    """The class with the largest statistic and its p-value under a Gamma law fitted to the others."""
    from scipy.stats import gamma

    s = np.asarray(stats)
    top = int(s.argmax())
    a, loc, scale = gamma.fit(np.delete(s, top))
    return top, float(1 - gamma.cdf(s[top], a=a, loc=loc, scale=scale) ** len(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--starts", type=int, default=30)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in args.models:
        model, meta = load_model(path)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        shape = tuple((meta.get("dataset") or {}).get("image_shape") or (3, 32, 32))
        classes = int((meta.get("dataset") or {}).get("num_classes") or 10)
        t0 = time.perf_counter()
        stats = max_margins(model, classes, shape, args.starts, args.steps, args.seed)
        top, p = gamma_p_value(stats)
        attack = meta.get("attack") or {}
        print(json.dumps({"model": path.rsplit("/", 1)[-1], "attack": attack.get("name", "none"),
                          "target": attack.get("target"), "stats": [round(v, 1) for v in stats], "top": top,
                          "p_value": p, "flagged": p < 0.05, "seconds": round(time.perf_counter() - t0)}),
              flush=True)


if __name__ == "__main__":
    main()
