"""Activation clipping on cached models (issue 19, candidate 4 of docs/default-purifier-devlog.md).

    OMP_NUM_THREADS=1 python benchmarks/clipping_probe.py MODEL [MODEL ...]
        --variant {authors,clean-max,scale,scale-free} [--nc] [--clean-size 500] [--seed 0] [--data-root DIR]

A per-channel upper bound ``a -> min(a, b_c)`` on the outputs of the first half of the model's
ReLU modules (forward order), set from the model's clean images only; no weight changes. The
clean images and the 1,000 Val images are drawn from the model's clean reserve as the bench
runner draws them (same seed, same sizes), so Val is comparable with the bench's. Variants:

- ``authors`` (4a): MM-BD's released mitigation as written (Wang et al., IEEE S&P 2024;
  github.com/wanghangpsu/MM-BD ``univ_bm.py``, read, not copied): bounds start at 8, loss
  ``MSE(f_clipped, f) + c * sum_l ||b_l||`` with Adam lr 0.1, 50 epochs of batch 200 over the clean
  images the model gets right, ``c`` x1.2 (else /1.2) every 10 epochs after the 10th while the
  clipped model keeps 95 % of them right;
- ``clean-max`` (4c): ``b`` = the channel's largest activation on the clean images;
- ``scale`` (4e): ``b = s * clean max``, ``s`` the smallest of 1.0, 0.9, ..., 0.1 at which the
  clipped model agrees with the unclipped one on at least 98 % of the clean images;
- ``scale-free`` (4f): 4a's objective made dimensionless (``MSE / Var(f)``, bounds relative to
  the clean max, penalty the mean RMS of the relative bounds), ``c`` steered after *every* epoch by
  98 % agreement, the bounds of the last epoch that met it returned.

Prints one JSON line per model: Val before / after, test ACC / ASR before (training time) and
after, the final ``c`` where there is one, seconds; ``--nc`` adds Neural Cleanse's verdict on the
clipped model (the devlog's rule 6). Test figures are recorded; they choose nothing.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from fipurify.bench.stages import _accuracy, clean_validation_set
from fipurify.datasets import draw_clean_subset
from fipurify.io import load_model
from fipurify.workflow import evaluate_saved, reload_data

AGREE = 0.98  # 4e / 4f: the clipped model must agree with the unclipped one on this share of the clean images


def early_relus(model: nn.Module) -> list[nn.Module]:
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    return relus[: max(1, len(relus) // 2)]


def predict_all(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 100]) for i in range(0, len(x), 100)])


def clean_maxima(model: nn.Module, mods: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel maximum of each module's output over the clean images (all positions)."""
    out: list[torch.Tensor | None] = [None] * len(mods)

    def record(k):
        def hook(_m, _i, o):
            m = o.detach().amax(dim=tuple(d for d in range(o.dim()) if d != 1))
            out[k] = m if out[k] is None else torch.maximum(out[k], m)
        return hook

    handles = [m.register_forward_hook(record(k)) for k, m in enumerate(mods)]
    predict_all(model, x)
    for h in handles:
        h.remove()
    return out  # type: ignore[return-value]


def clip_at(mods: list[nn.Module], bounds) -> None:
    """Clip each module's output at ``bounds[k]()`` (a callable, so that learned bounds stay live)."""
    for m, b in zip(mods, bounds):
        m.register_forward_hook(lambda _m, _i, o, b=b: torch.minimum(o, b().view(1, -1, *([1] * (o.dim() - 2)))))


def agreement(model: nn.Module, x: torch.Tensor, ref_pred: torch.Tensor) -> float:
    return float((predict_all(model, x).argmax(1) == ref_pred).float().mean())


def learn_bounds(model, mods, x, ref, *, start, penalty, steer_every, first_steer, criterion, keep_best, box=None):
    """The optimisation shared by ``authors`` and ``scale-free``: Adam lr 0.1 on the bound tensors
    ``start`` (one per module), 50 epochs of batch 200, ``c`` steered by ``criterion(model)``;
    ``box`` = (low, high) clamps the bounds after each step (the authors' code does not)."""
    params = [s.clone().requires_grad_(True) for s in start]
    clip_at(mods, [lambda p=p, k=k: penalty["map"](p, k) for k, p in enumerate(params)])
    opt = torch.optim.Adam(params, lr=0.1)
    c, g = 0.5, torch.Generator().manual_seed(0)
    best = [p.detach().clone() for p in params]
    for ep in range(50):
        for j in torch.randperm(len(x), generator=g).split(200):
            loss = penalty["fit"](model(x[j]), ref[j]) + c * penalty["size"](params)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if box is not None:
                with torch.no_grad():
                    for p in params:
                        p.clamp_(*box)
        if ep >= first_steer and ep % steer_every == 0:
            ok = criterion(model)
            if ok and keep_best:
                best = [p.detach().clone() for p in params]
            c = c * 1.2 if ok else c / 1.2
    if keep_best:
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    return c


def run(path: str, variant: str, clean_size: int, seed: int, data_root: str | None, nc: bool) -> dict:
    model, meta = load_model(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    bundle = reload_data(meta, data_root)
    clean, idx = draw_clean_subset(bundle.reserve, clean_size, seed, return_indices=True)
    val = clean_validation_set(bundle.reserve, idx, seed)
    x = torch.stack([clean[i][0] for i in range(len(clean))])
    y = torch.as_tensor([int(clean[i][1]) for i in range(len(clean))])
    val_before = _accuracy(model, val)
    t0 = time.perf_counter()
    mods = early_relus(model)
    maxima = clean_maxima(model, mods, x)
    ref = predict_all(model, x)
    ref_pred = ref.argmax(1)
    c = None
    if variant == "clean-max":
        clip_at(mods, [lambda b=b: b for b in maxima])
    elif variant == "scale":
        scale = {"s": 1.0}
        clip_at(mods, [lambda b=b: scale["s"] * b for b in maxima])
        chosen = 1.0
        for s in [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]:
            scale["s"] = s
            if agreement(model, x, ref_pred) < AGREE:
                break
            chosen = s
        scale["s"] = chosen
        c = chosen
    elif variant == "authors":
        right = ref_pred == y
        xr, yr, rr = x[right], y[right], ref[right]
        c = learn_bounds(model, mods, xr, rr, start=[torch.full_like(b, 8.0) for b in maxima],
                         penalty={"map": lambda p, k: p, "fit": F.mse_loss,
                                  "size": lambda ps: sum(p.norm() for p in ps)},
                         steer_every=10, first_steer=11, keep_best=False,
                         criterion=lambda m: float((predict_all(m, xr).argmax(1) == yr).float().mean()) >= 0.95)
    elif variant == "scale-free":
        var = ref.var()
        c = learn_bounds(model, mods, x, ref, start=[torch.ones_like(b) for b in maxima],
                         penalty={"map": lambda p, k: maxima[k] * p,
                                  "fit": lambda out, r: F.mse_loss(out, r) / var,
                                  "size": lambda ps: torch.stack([p.norm() / p.numel() ** 0.5 for p in ps]).mean()},
                         steer_every=1, first_steer=0, keep_best=True, box=(0.0, 1.0),
                         criterion=lambda m: agreement(m, x, ref_pred) >= AGREE)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        val_after = _accuracy(model, val)
        after = evaluate_saved(model, meta, data_root)
    before = meta.get("metrics") or {}
    row = {"model": path.rsplit("/", 1)[-1], "attack": (meta.get("attack") or {}).get("name", "none"),
           "variant": variant, "val_before": round(100 * val_before, 1), "val_after": round(100 * val_after, 1),
           "acc_before": before.get("acc"), "asr_before": before.get("asr"),
           "acc_after": after["acc"], "asr_after": after.get("asr"), "c_or_s": c, "seconds": round(seconds, 1)}
    if nc:
        import fipurify

        rep = fipurify.detect(model, clean, seed=seed)
        row["neural_cleanse_after"] = {"flagged": rep.backdoored, "score": rep.score, "candidate": rep.candidate}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--variant", required=True, choices=["authors", "clean-max", "scale", "scale-free"])
    ap.add_argument("--nc", action="store_true", help="also run Neural Cleanse on the clipped model")
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in args.models:
        print(json.dumps(run(path, args.variant, args.clean_size, args.seed, args.data_root, args.nc)), flush=True)


if __name__ == "__main__":
    main()
