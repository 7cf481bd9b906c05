"""Would Neural Cleanse in feature space find the triggers it misses in pixel space? A probe (issue 18).

    OMP_NUM_THREADS=1 python benchmarks/feature_probe.py MODEL [MODEL ...] [--layers layer3 layer4]
        [--clean-size 500] [--seed 0] [--max-steps 100] [--stop-patience 10] [--mask-init 0.05]
        [--pattern map|channel] [--bound layer|channel]

Neural Cleanse looks for the smallest pixel mask and pattern that send clean images to a class;
it cannot express a warping (WaNet), per-image (Dynamic, ISSBA), style (FBA) or full-image
signal (SIG) trigger. In the network, though, every trigger ends as a few feature channels that
the model learned to read as "target" (the observation behind pruning defenses such as CLP and
ANP, and behind ABS's neuron stimulation). So the probe asks Neural Cleanse's question at a
layer's output ``A`` (C x H x W) instead of at the pixels::

    A' = (1 - m) * A + m * p,   m in [0, 1]^C (one value per channel),
    p = lo + (hi - lo) * sigmoid(b)  (``--pattern map``: C x H x W; ``channel``: C x 1 x 1, one
                                      value per channel; inside the range [lo, hi] the layer's
                                      outputs take on the clean images: the whole layer's with
                                      ``--bound layer``, each channel's own with ``channel``)
    min_{m, b}  CE(f_after(A'), c) + lambda * ||m||_1

with Neural Cleanse's cost schedule and early stop (``fipurify.detection.neural_cleanse``),
size = ``||m||_1`` (channels), and the same small-side MAD test (index > 2). The layer's outputs
on the clean images are computed once; the optimisation runs only the part of the model after
the layer (:func:`suffix`, cut with ``torch.fx``), so a probe at the last stage costs seconds.
The images and their split are the detectors' (``Detector.split``: optimise on 80 %, measure the
proxy on 20 % held out). The attack is read from the model's metadata for the printed
line only; nothing here uses test data or the trigger.

Prints one JSON line per (model, layer).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class _Replace:
    """Forward hook on ``layer``: its output becomes ``fn(output)`` while active."""

    def __init__(self, layer: nn.Module, fn):
        self.handle = layer.register_forward_hook(lambda mod, inp, out: fn(out))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def suffix(model: nn.Module, name: str) -> nn.Module:
    """The part of ``model`` after its submodule ``name``, as a module taking that layer's output
    (torch.fx; every module off the path from the root to the layer is traced as a leaf)."""
    import torch.fx as fx

    target = dict(model.named_modules())[name]
    path = {n for n, mod in model.named_modules() if mod is not target and any(s is target for s in mod.modules())}

    class Tracer(fx.Tracer):
        def is_leaf_module(self, mod, qualname):
            return qualname not in path

    gm = fx.GraphModule(model, Tracer().trace(model))
    graph = gm.graph
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == name)
    with graph.inserting_before(next(iter(graph.nodes))):
        ph = graph.placeholder("features")
    node.replace_all_uses_with(ph)
    graph.eliminate_dead_code()
    for n in list(graph.nodes):
        if n.op == "placeholder" and n is not ph and not n.users:
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return gm


def layer_outputs(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    seen = []
    with _Replace(layer, lambda out: seen.append(out.detach()) or out), torch.no_grad():
        for i in range(0, len(images), 256):
            model(images[i:i + 256])
    return torch.cat(seen)


def layer_range(model: nn.Module, layer: nn.Module, images: torch.Tensor, per_channel: bool = False):
    """The layer's output shape (C x H x W) and the range [lo, hi] of its values on ``images``
    (scalars, or C x 1 x 1 tensors with ``per_channel``)."""
    seen = []
    with _Replace(layer, lambda out: seen.append(out.detach()) or out), torch.no_grad():
        for i in range(0, len(images), 256):
            model(images[i:i + 256])
    a = torch.cat(seen)
    if per_channel:
        flat = a.transpose(0, 1).reshape(a.shape[1], -1)
        return a.shape[1:], flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return a.shape[1:], float(a.min()), float(a.max())


def reverse(head, images, target, shape, lo, hi, g, *, max_steps=100, batch=64, lr=0.1,
            init_cost=1e-3, mult=1.5, patience=5, stop_patience=10, min_improvement=0.01, mask_init=0.05,
            flip_rate=0.9, pattern="map"):
    """Neural Cleanse's optimisation (its :class:`CostSchedule`) with a per-channel mask at ``layer``
    (see the docstring)."""
    from fipurify.detection.neural_cleanse import CostSchedule

    c_, h, w = shape
    a = torch.full((c_, 1, 1), math.atanh(2 * mask_init - 1), requires_grad=True)
    b = torch.zeros((c_, h, w) if pattern == "map" else (c_, 1, 1), requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=lr, betas=(0.5, 0.9))
    labels = torch.full((min(batch, len(images)),), target)
    schedule = CostSchedule(init_cost, mult, patience, stop_patience, min_improvement)
    best, step = None, 0
    for step in range(1, max_steps + 1):
        x = images[torch.randint(len(images), (len(labels),), generator=g)]
        m = (torch.tanh(a) + 1) / 2
        p = lo + (hi - lo) * torch.sigmoid(b)
        out = head((1 - m) * x + m * p)
        l1 = m.sum()
        loss = F.cross_entropy(out, labels) + schedule.cost * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        flip = float((out.argmax(1) == target).float().mean())
        size = float(l1.detach())
        if schedule.record(flip >= flip_rate, size):
            best = (size, m.detach().clone(), p.detach().clone())
        if schedule.done:
            break
    if best is None:
        with torch.no_grad():
            return float(((torch.tanh(a) + 1) / 2).sum()), None, None, False, step
    return best[0], best[1], best[2], True, step


def held_out_flip(head, feats, target, m, p) -> float:
    with torch.no_grad():
        return float((head((1 - m) * feats + m * p).argmax(1) == target).float().mean())


def combined_sizes(size_lists: list[list[float]]) -> list[float]:
    """One size per class from several detectors' sizes: the geometric mean over the detectors of
    each class's size divided by that detector's median size (so every detector weighs the same
    whatever its units)."""
    import numpy as np

    logs = [np.log(np.asarray(v, dtype=float)) - np.log(np.median(v)) for v in size_lists]
    return np.exp(np.mean(logs, axis=0)).tolist()


def main() -> None:
    from fipurify.detection import create, most_anomalous
    from fipurify.detection.base import _frozen
    from fipurify.io import load_model
    from fipurify.workflow import reserve_sample

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--stop-patience", type=int, default=10)
    ap.add_argument("--mask-init", type=float, default=0.05)
    ap.add_argument("--pattern", choices=["map", "channel"], default="map",
                    help="map: a C x H x W pattern; channel: one value per channel, the same at every position")
    ap.add_argument("--bound", choices=["layer", "channel"], default="layer",
                    help="the pattern's range: the layer's clean range, or each channel's own")
    ap.add_argument("--combine", action="store_true",
                    help="also run Neural Cleanse in pixel space on the same images and test the combined sizes "
                         "(combined_sizes over the pixel sizes and each layer's)")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in args.models:
        model, meta = load_model(path)
        clean = reserve_sample(meta, args.clean_size, args.seed, args.data_root)
        data = create("neural-cleanse", seed=args.seed).split(model, clean)
        attack = meta.get("attack") or {}
        lists = []
        for name in args.layers:
            layer = dict(model.named_modules())[name]
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(args.seed)
            with _frozen(model):
                shape, lo, hi = layer_range(model, layer, data.x_opt, per_channel=args.bound == "channel")
                head = suffix(model, name)
                f_opt, f_hold = layer_outputs(model, layer, data.x_opt), layer_outputs(model, layer, data.x_hold)
                sizes, holds, steps = [], [], []
                for c in range(data.num_classes):
                    size, m, p, ok, st = reverse(head, f_opt[data.y_opt != c], c, shape, lo, hi, g,
                                                 max_steps=args.max_steps, stop_patience=args.stop_patience,
                                                 mask_init=args.mask_init, pattern=args.pattern)
                    sizes.append(size)
                    steps.append(st)
                    holds.append(held_out_flip(head, f_hold[data.y_hold != c], c, m, p) if ok else None)
            lists.append(sizes)
            top, index = most_anomalous(sizes)
            print(json.dumps({"model": str(path).rsplit("/", 1)[-1], "attack": attack.get("name", "none"),
                              "target": attack.get("target"), "asr": (meta.get("metrics") or {}).get("asr"),
                              "layer": name, "max_steps": args.max_steps, "stop_patience": args.stop_patience, "channels": shape[0], "pattern": args.pattern, "bound": args.bound,
                              "candidate": top, "anomaly_index": round(index, 2), "flagged": bool(index > 2),
                              "sizes": [round(s, 2) for s in sizes],
                              "proxy": None if holds[top] is None else round(holds[top], 3),
                              "steps": steps, "seconds": round(time.perf_counter() - t0)}), flush=True)
        if args.combine:
            t0 = time.perf_counter()
            nc = create("neural-cleanse", seed=args.seed).detect(model, clean)
            pixel = [r["size"] for r in nc.per_class]
            both = combined_sizes([pixel, *lists])
            top, index = most_anomalous(both)
            print(json.dumps({"model": str(path).rsplit("/", 1)[-1], "attack": attack.get("name", "none"),
                              "target": attack.get("target"), "combined": ["pixel", *args.layers],
                              "pixel_candidate": nc.candidate, "pixel_index": round(nc.score, 2),
                              "pixel_sizes": [round(v, 1) for v in pixel],
                              "candidate": top, "anomaly_index": round(index, 2), "flagged": bool(index > 2),
                              "sizes": [round(v, 3) for v in both],
                              "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()
