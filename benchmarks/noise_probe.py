"""Does adversarial neuron noise point at a backdoor's target? A probe (issue 18).

    OMP_NUM_THREADS=1 python benchmarks/noise_probe.py MODEL [MODEL ...] [--eps 0.1 0.2 0.3 0.4]
        [--steps 30] [--batch-size 128] [--clean-size 500] [--seed 0] [--target-accuracy A]

The observation behind BAN (Xu et al., "BAN: Detecting Backdoors Activated by Adversarial Neuron
Noise", NeurIPS 2024; github.com/xiaoyunxxy/ban, read, not copied) and ANP: a small adversarial
perturbation of a backdoored model's neurons, found on clean images alone, wakes the backdoor, so
the clean images it breaks fall into the *target* class; a clean model's errors spread over the
classes. ANP, built on the same effect, removes SIG, WaNet and Dyn-one at our scale
(``docs/benchmarks/table1-core.md``), which Neural Cleanse cannot see.

The probe perturbs every affine BatchNorm channel as ANP does (``gamma * (1 + delta)``,
``beta * (1 + xi)``, ``|delta|, |xi| <= eps``; :class:`fipurify.defenses.anp.NeuronPerturbation`),
from a seeded random start, by ``steps`` signed-gradient ascent steps of ``eps / steps`` on the
cross-entropy of the clean images (batches of ``batch_size`` taken in turn), the model in eval mode.
With ``--target-accuracy A`` the level is not given but set from the clean images: the smallest eps in
``[0, 0.4]`` at which the perturbed model gets at most a share ``A`` of them right (:func:`calibrated_eps`).
Then, over the clean images, each class's *received share*: the share of the images of the other
classes that the perturbed model puts into it. The candidate is the class that receives the most,
scored by the MAD anomaly index on the large side (``fipurify.detection.most_anomalous`` of the
negated shares) against the class-count-aware threshold (2 for ten classes).

Not BAN itself: BAN also learns a feature mask that separates benign from backdoor features and
tests the perturbed model on the masked-out part, resets the noise per batch, and decides by
the perturbed model's prediction distribution. This is the noise alone, with our outlier test.

The images and their split are the detectors' (``Detector.split``); the score uses all of them
(the optimisation part and the held-out part), the held-out part alone is printed beside it. The
attack is read from the model's metadata for the printed line only; nothing here uses test data
or the trigger. Prints one JSON line per (model, eps).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def received_shares(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    batch_size: int = 256) -> tuple[np.ndarray, float]:
    """Per class ``c``: the share of the images of the other classes that ``model`` predicts as
    ``c``; and the model's accuracy on ``(x, y)``."""
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    shares = np.array([float((pred[y != c] == c).float().mean()) if bool((y != c).any()) else 0.0
                       for c in range(num_classes)])
    return shares, float((pred == y).float().mean())


def adversarial_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                      batch_size: int, generator: torch.Generator):
    """An ANP-style neuron perturbation of ``model`` (hooks left in place, perturbation on) that
    raises the cross-entropy of ``(x, y)``: random start in ``[-eps, eps]``, ``steps`` signed steps
    of ``eps / steps``, each on the next batch; returns the perturbation object (``.remove()`` it)."""
    from fipurify.defenses.anp import NeuronPerturbation

    pert = NeuronPerturbation(model, eps)
    pert.perturb = True
    pert.reset_noise(generator)
    noise = pert.noise_w + pert.noise_b
    order = torch.randperm(len(x), generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(x), batch_size)]
    for step in range(steps):
        j = batches[step % len(batches)]
        loss = F.cross_entropy(model(x[j]), y[j])
        grads = torch.autograd.grad(loss, noise)
        with torch.no_grad():
            for q, g in zip(noise, grads):
                q.add_(g.sign(), alpha=eps / steps)
        pert.clip()
    return pert


def calibrated_eps(measure, target: float, high: float = 0.4, halvings: int = 8) -> float:
    """The smallest noise level in ``[0, high]`` (to ``high / 2 ** halvings``) at which
    ``measure(eps)`` (the clean accuracy under noise of that level) is at most ``target``, by
    bisection; ``high`` if even that level keeps the accuracy above ``target``."""
    lo, hi = 0.0, float(high)
    for _ in range(halvings):
        mid = (lo + hi) / 2
        if measure(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def main() -> None:
    from fipurify.detection import class_count_threshold, create, most_anomalous
    from fipurify.detection.base import _frozen
    from fipurify.io import load_model
    from fipurify.workflow import reserve_sample

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--eps", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-accuracy", type=float, default=None,
                    help="instead of --eps: the smallest eps in [0, 0.4] at which the clean accuracy under noise "
                         "is at most this (bisection, 8 halvings)")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in args.models:
        model, meta = load_model(path)
        clean = reserve_sample(meta, args.clean_size, args.seed, args.data_root)
        data = create("neural-cleanse", seed=args.seed).split(model, clean)
        x, y = torch.cat([data.x_opt, data.x_hold]), torch.cat([data.y_opt, data.y_hold])
        attack = meta.get("attack") or {}
        k = data.num_classes

        def probe(eps):
            g = torch.Generator().manual_seed(args.seed)
            with _frozen(model):
                pert = adversarial_noise(model, x, y, eps, args.steps, args.batch_size, g)
                try:
                    shares, acc = received_shares(model, x, y, k)
                    held, _ = received_shares(model, data.x_hold, data.y_hold, k)
                finally:
                    pert.remove()
            return shares, acc, held

        levels = args.eps
        if args.target_accuracy is not None:
            t_cal = time.perf_counter()
            levels = [calibrated_eps(lambda e: probe(e)[1], args.target_accuracy)]
            calibration = time.perf_counter() - t_cal
        for eps in levels:
            t0 = time.perf_counter()
            shares, acc, held = probe(eps)
            top, index = most_anomalous(-shares)
            threshold = class_count_threshold(2.0, k)
            print(json.dumps({"model": str(path).rsplit("/", 1)[-1], "attack": attack.get("name", "none"),
                              "target": attack.get("target"), "asr": (meta.get("metrics") or {}).get("asr"),
                              "eps": eps, "steps": args.steps, "accuracy_under_noise": round(acc, 3),
                              "candidate": top, "anomaly_index": round(index, 2), "threshold": round(threshold, 2),
                              "flagged": bool(index > threshold), "received": [round(s, 3) for s in shares],
                              "received_holdout": [round(s, 3) for s in held],
                              "target_accuracy": args.target_accuracy,
                              "seconds": round(time.perf_counter() - t0 + (calibration if args.target_accuracy
                                                                          is not None else 0.0), 1)}), flush=True)


if __name__ == "__main__":
    main()
