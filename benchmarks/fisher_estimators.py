"""Cost and accuracy of the Fisher-trace estimators on a small PreActResNet with BatchNorm.

Run:  python benchmarks/fisher_estimators.py [--width 8] [--batch 64] [--sub-batch 16] [--threads 1]

Prints two tables:
1. wall time of one training step's forward + backward: CE alone, CE + sampled Tr(F)
   (double backprop), CE + exact per-example Tr(F) on a sub-batch, CE + exact-expected,
   with respect to all weights (FIP) and to the spectral shifts delta (f-FIP);
2. the estimates: mean and relative spread of repeated draws of each estimator against the
   exact-expected trace on the same examples, in eval mode (where "sampled" is unbiased) and
   in train mode (BatchNorm batch statistics couple the examples, which biases "sampled").
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fipurify.curvature.fisher import fisher_trace
from fipurify.curvature.spectral import attach_spectral, spectral_parameters


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                      if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.short(out) if self.short is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + short


class TinyPreActResNet18(nn.Module):
    """Stand-in PreActResNet18 (2-2-2-2 blocks) used when fipurify.models is unavailable."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        blocks, cin = [], w[0]
        for i, c in enumerate(w):
            for j in range(2):
                blocks.append(_Block(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


def make_model(width: int) -> tuple[nn.Module, str]:
    try:
        from fipurify.models import create
        return create("preactresnet18", width=width), "fipurify.models preactresnet18"
    except Exception:  # the model zoo may not be there yet
        return TinyPreActResNet18(width), "inline TinyPreActResNet18"


def timed(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function; runs them round-robin so load spikes hit all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def step(model, params, x, y, estimator, sub_batch, gen):
    def run():
        for p in params:
            p.grad = None
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if estimator == "sampled":
            loss = loss + 1e-3 * fisher_trace(model, None, params, "sampled", logits=logits,
                                              generator=gen)
        elif estimator is not None:
            loss = loss + 1e-3 * fisher_trace(model, x, params, estimator, sub_batch=sub_batch,
                                              generator=gen)
        loss.backward()
    return run


def draws(model, x, params, estimator, n, sub_batch, gen):
    return [fisher_trace(model, x, params, estimator, create_graph=False, sub_batch=sub_batch,
                         generator=gen).item() for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sub-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    # One thread by default: on a shared CPU, oversubscribed OpenMP threads made steps 20-100x
    # slower and the timings meaningless.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    base, source = make_model(args.width)
    x = torch.rand(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    # Make eval-mode BN use exactly this batch's statistics, so eval and train mode compute
    # (almost) the same function here and their difference isolates the batch coupling.
    with torch.no_grad():
        base.train()
        momenta = {m: m.momentum for m in base.modules() if isinstance(m, nn.BatchNorm2d)}
        for m in momenta:
            m.momentum = 1.0
        base(x[:args.sub_batch])  # the examples of table 2
        for m, mom in momenta.items():
            m.momentum = mom

    spectral = copy.deepcopy(base)
    attach_spectral(spectral)
    setups = {
        "weights": (base, [p for p in base.parameters() if p.requires_grad]),
        "deltas": (spectral, spectral_parameters(spectral)),
    }
    print(f"model: {source}, width {args.width}; batch {args.batch} x 3x32x32; "
          f"sub-batch {args.sub_batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'} (this script runs on the CPU)")
    for name, (model, params) in setups.items():
        print(f"  params w.r.t. {name}: {sum(p.numel() for p in params):,} entries")

    print("\n1) one training step (train mode), median of", args.repeats, "runs, seconds")
    print(f"{'w.r.t.':<8} {'CE':>8} {'+sampled':>9} {'+exact':>8} {'+exact-exp':>11}")
    for name, (model, params) in setups.items():
        model.train()
        row = timed([step(model, params, x, y, est, args.sub_batch, gen)
                     for est in (None, "sampled", "exact", "exact-expected")], args.repeats)
        print(f"{name:<8} {row[0]:8.3f} {row[1]:9.3f} {row[2]:8.3f} {row[3]:11.3f}"
              f"   (x{row[1] / row[0]:.1f}, x{row[2] / row[0]:.1f}, x{row[3] / row[0]:.1f} of CE)")

    print(f"\n2) estimates on the same {args.sub_batch} examples; {args.draws} draws each; "
          "truth = exact-expected (BN on running stats)")
    print(f"{'w.r.t.':<8} {'mode':<6} {'truth':>10} {'sampled':>10} {'+-rel sd':>9} "
          f"{'ratio':>6} {'exact':>10} {'+-rel sd':>9} {'ratio':>6}")
    xs = x[:args.sub_batch]
    for name, (model, params) in setups.items():
        model.eval()
        truth = fisher_trace(model, xs, params, "exact-expected", create_graph=False,
                             sub_batch=len(xs), chunk_size=4).item()
        for mode in ("eval", "train"):
            model.train(mode == "train")
            s = draws(model, xs, params, "sampled", args.draws, None, gen)
            e = draws(model, xs, params, "exact", args.draws, len(xs), gen)
            ms, me = statistics.mean(s), statistics.mean(e)
            print(f"{name:<8} {mode:<6} {truth:10.4g} {ms:10.4g} {statistics.stdev(s) / ms:9.2f} "
                  f"{ms / truth:6.3f} {me:10.4g} {statistics.stdev(e) / me:9.2f} {me / truth:6.3f}")
    print("ratio = mean of draws / truth; '+-rel sd' = spread of one draw relative to its mean;"
          " the standard error of a ratio is about rel sd / sqrt(draws).")


if __name__ == "__main__":
    main()
