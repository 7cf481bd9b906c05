"""Hessian-vector-product back-ends: accuracy against the exact Hessian and speed on the CPU preset net.

    OMP_NUM_THREADS=1 python benchmarks/hessian_backends.py [--hvps 5] [--batch 200] [--width 16]
        [--curvlinops-path DIR]

Back-ends: our double back-propagation ("autograd", with and without the cached gradient
graph), our forward-over-reverse ("func", torch.func.jvp of torch.func.grad), and
curvlinops' HessianLinearOperator when it can be imported (``--curvlinops-path`` adds a
folder, e.g. one made by ``pip install --target DIR --no-deps curvlinops-for-pytorch ...``,
to sys.path so the project's environment stays untouched).

Accuracy: a small conv net with BatchNorm (eval mode), dense Hessian column by column vs
``torch.func.hessian``; also lambda_max / Tr(H) against the exact eigenvalues. Speed:
PreActResNet18 (width 16, 10 classes) on a batch of synthetic 32x32 images, the time of
the first product (includes building the graph) and the mean of the next ones, each
back-end in its own process so its peak memory (VmHWM) is its own; and the median time
per product with the back-ends taking turns in one process (fairer on a busy machine).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

BACKENDS = ["autograd-cached", "autograd", "func", "curvlinops"]


def _curvlinops(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        from curvlinops import HessianLinearOperator
        return HessianLinearOperator
    except Exception as e:  # not installed or broken: report, do not fail
        print(f"curvlinops unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _product_fn(backend: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cl_path: str | None):
    """A flat v -> H v function for one back-end (model in eval mode)."""
    from fipurify.curvature.hvp import HessianOperator

    params = [p for p in model.parameters()]
    if backend.startswith("autograd") or backend == "func":
        op = HessianOperator(model, [(x, y)], params, backend="func" if backend == "func" else "autograd",
                             cache_graph=backend == "autograd-cached")
        return op.matvec
    cls = _curvlinops(cl_path)
    if cls is None:
        return None
    op = cls(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)

    def mv(v: torch.Tensor) -> torch.Tensor:
        return (op @ v.to(torch.float32)).to(v.dtype)
    return mv


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():  # non-trivial running statistics
        net.train()
        for _ in range(5):
            net(torch.rand(64, 3, 8, 8))
    return net.eval()


def accuracy(cl_path: str | None) -> list[dict]:
    from fipurify.analysis import hutchinson, top_eigenvalues

    net = tiny_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()
    net64 = tiny_net().double()

    def loss(f):
        parts = torch.split(f, [s.numel() for s in shapes])
        out = functional_call(net64, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, (x.double(),))
        return F.cross_entropy(out, y)

    exact = hessian(loss)(flat)  # float64 reference
    ev = torch.linalg.eigvalsh(exact)
    rows = []
    for b in BACKENDS:
        mv = _product_fn(b, net, x, y, cl_path)
        if mv is None:
            continue
        dense = torch.stack([mv(e) for e in torch.eye(len(flat), dtype=torch.float64)], 1)
        lm = top_eigenvalues(mv, len(flat), 1, steps=40, generator=torch.Generator().manual_seed(0)).lambda_max
        tr = hutchinson(mv, len(flat), 400, torch.Generator().manual_seed(0))
        rows.append({"backend": b, "dim": len(flat), "max_rel_err": float((dense - exact).abs().max() / exact.abs().max()),
                     "lambda_max": lm, "lambda_max_exact": float(ev[-1]), "trace_hutchinson": tr.value,
                     "trace_stderr": tr.stderr, "trace_exact": float(exact.trace())})
    return rows


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process in MB (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def speed(backend: str, hvps: int, batch: int, width: int, cl_path: str | None) -> dict:
    from fipurify import models

    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=10, width=width).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    dim = sum(p.numel() for p in model.parameters())
    rss0 = _status_mb("VmRSS")
    mv = _product_fn(backend, model, x, y, cl_path)
    if mv is None:
        return {"backend": backend, "available": False}
    vs = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(hvps + 1)]
    t0 = time.perf_counter()
    out0 = mv(vs[0])
    first = time.perf_counter() - t0
    times = []
    for v in vs[1:]:
        t0 = time.perf_counter()
        mv(v)
        times.append(time.perf_counter() - t0)
    return {"backend": backend, "available": True, "dim": dim, "batch": batch, "first_s": first,
            "mean_next_s": sum(times) / len(times), "peak_rss_mb": _status_mb("VmHWM"),
            "rss_before_mb": rss0, "hv0_norm": float(out0.norm()), "threads": torch.get_num_threads()}


def interleaved(rounds: int, batch: int, width: int, cl_path: str | None) -> dict:
    """Median seconds per product, the back-ends taking turns (a shared, noisy machine slows all alike)."""
    from statistics import median

    from fipurify import models

    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=10, width=width).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    dim = sum(p.numel() for p in model.parameters())
    fns = {b: _product_fn(b, model, x, y, cl_path) for b in BACKENDS}
    fns = {b: f for b, f in fns.items() if f is not None}
    times: dict[str, list[float]] = {b: [] for b in fns}
    ref = {}
    for r in range(rounds + 1):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        for b, f in fns.items():
            t0 = time.perf_counter()
            hv = f(v)
            if r:  # round 0 builds graphs / warms up
                times[b].append(time.perf_counter() - t0)
            ref[b] = hv
    base = ref["autograd"]
    return {b: {"median_s": median(t), "rel_diff_vs_autograd": float((ref[b] - base).norm() / base.norm())}
            for b, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hvps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--curvlinops-path", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(speed(args.worker, args.hvps, args.batch, args.width, args.curvlinops_path)))
        return
    print(json.dumps({"interleaved": interleaved(args.hvps, args.batch, args.width, args.curvlinops_path)}))
    acc = accuracy(args.curvlinops_path)
    for r in acc:
        print(json.dumps(r))
    for b in BACKENDS:
        cmd = [sys.executable, __file__, "--worker", b, "--hvps", str(args.hvps), "--batch", str(args.batch),
               "--width", str(args.width)]
        if args.curvlinops_path:
            cmd += ["--curvlinops-path", args.curvlinops_path]
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(res.stdout.strip().splitlines()[-1] if res.returncode == 0 else
              json.dumps({"backend": b, "error": res.stderr.strip().splitlines()[-1:]}))


if __name__ == "__main__":
    main()
