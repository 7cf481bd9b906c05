"""One GPU session for the FIP issue: width-64 timing, a paper-style (sharper) backdoored
model, and a purification sweep with clean-validation accuracy beside test ACC / ASR.

    python benchmarks/gpu_session.py --out DIR [--budget-s 500] [--smoke]

Written for a lent GPU with a fixed time budget: every result is appended to
``DIR/gpu_session.jsonl`` as soon as it exists, and no new run starts once the budget is
spent. ``--smoke`` runs every step on tiny synthetic data (CPU-friendly check).
Selection of defaults must use ``val_acc`` (clean reserve images, disjoint from the 500
purification images) only; test ACC/ASR are recorded for the record.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from presets import CPU_PRESET, model_path

from fipurify import attacks, defenses, load_model, save_model
from fipurify.datasets import draw_clean_subset
from fipurify.defenses.loop import PurificationDiverged
from fipurify.metrics import accuracy, evaluate, predict
from fipurify.training import TrainConfig, train_model
from fipurify.workflow import build_model, load_data

T0 = time.perf_counter()

# name -> (method, options); the first group is the paper's rows, then probes of the
# "why does it not purify" hypotheses (penalty strength, learning rate, BN mode, scale).
SWEEP = {
    "ft-paper": ("ft", {}),
    "ffip-paper": ("ffip", {}),
    "fip-paper": ("fip", {}),
    "ffip-no-trf": ("ffip-no-trf", {}),
    "ffip-no-lr": ("ffip-no-lr", {}),
    "ft-lr0.05": ("ft", {"lr": 0.05}),
    "ffip-lr0.1-etaF0.1-k1": ("ffip", {"lr": 0.1, "eta_f": 0.1, "fisher_every": 1}),
    "ffip-lr0.1-etaF1-k1": ("ffip", {"lr": 0.1, "eta_f": 1.0, "fisher_every": 1}),
    "ffip-lr0.1-etaF0.1-k1-bneval": ("ffip", {"lr": 0.1, "eta_f": 0.1, "fisher_every": 1, "bn_mode": "eval"}),
    "fip-etaF0.01-k1": ("fip", {"eta_f": 0.01, "fisher_every": 1}),
    "fip-etaF0.1-k1-clip": ("fip", {"eta_f": 0.1, "fisher_every": 1, "grad_clip": 5.0}),
    "ffip-raw-lr1-etaF0.01-k1": ("ffip", {"lr": 1.0, "eta_f": 0.01, "fisher_every": 1, "fisher_normalize": "none"}),
}
SHORT = ["ft-paper", "ffip-paper", "fip-paper", "ffip-lr0.1-etaF1-k1"]


class Tensors(Dataset):
    """Images and labels held as tensors (fast item access for the training loader)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        self.x, self.y, self.num_classes = x, y, num_classes
        self.labels = y.numpy()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(out: Path, row: dict) -> None:
    row["elapsed_s"] = round(time.perf_counter() - T0, 1)
    with open(out / "gpu_session.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def timing(out: Path, bundle, device: str, width: int, epochs: int, n_clean: int) -> None:
    """Purification wall time of f-FIP, FT and FIP(theta) on a width-``width`` PreActResNet18."""
    clean = draw_clean_subset(bundle.reserve, n_clean, 0)
    for method, opts in [("ffip", {}), ("ffip", {"estimator": "sampled"}), ("ft", {}), ("fip", {})]:
        model = build_model("preactresnet18", bundle, width, 0).to(device)
        d = defenses.create(method, "cifar10", epochs=epochs, holdout=0.0, **opts)
        sync()
        t = time.perf_counter()
        d.purify(model, clean, progress=False)
        sync()
        wall = time.perf_counter() - t
        emit(out, {"kind": "timing", "method": method, "opts": opts, "width": width, "epochs": epochs,
                   "n_clean": n_clean, "wall_s": wall, "seconds": d.report["seconds"],
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})


def paper_style_model(out: Path, bundle, device: str, width: int, epochs: int, step: int, size: int):
    """BadNets model trained like the paper (lr 0.01, x0.1 steps), not one-cycle annealed."""
    attack = attacks.create("badnets", target=0, poison_rate=0.1, seed=0)
    poisoned = attack.poison(bundle.train)
    x, y = poisoned.as_arrays()
    nc = bundle.dataset_info["num_classes"]
    model = build_model("preactresnet18", bundle, width, 0).to(device)
    cfg = TrainConfig(epochs=epochs, lr=0.01, schedule="step", step_epochs=step, gamma=0.1, seed=0,
                      eval_every=max(1, epochs // 4))
    bd = attack.backdoor_test_set(bundle.test)
    hist = train_model(model, Tensors(x, y, nc), cfg, clean_test=bundle.test, backdoor_test=bd,
                       progress=False, log=lambda m: print(m, flush=True))
    meta = {"dataset": bundle.dataset_info, "clean_reserve": bundle.reserve_info, "attack": attack.to_spec(),
            "train_config": cfg.to_dict(), "seed": 0, "history": hist,
            "metrics": {k: hist[-1].get(k) for k in ("acc", "asr", "lcr")}}
    path = out / f"paper-style-badnets-w{width}-e{epochs}.safetensors"
    try:
        save_model(model, path, meta)
    except Exception as e:  # the weights are a bonus; the sweep goes on without the file
        print(f"could not save the model: {e}", flush=True)
    emit(out, {"kind": "train", "model": "paper-style-badnets", "width": width, "epochs": epochs,
               "acc": hist[-1].get("acc"), "asr": hist[-1].get("asr"),
               "train_s": sum(r["seconds"] for r in hist)})
    return model.eval(), attack


def sweep(out: Path, tag: str, model, attack, bundle, names, budget_s: float, n_clean: int) -> None:
    clean, used = draw_clean_subset(bundle.reserve, n_clean, 0, return_indices=True)
    rest = np.setdiff1d(np.arange(len(bundle.reserve)), used)
    val = bundle.reserve.subset(np.random.default_rng(1).permutation(rest)[:1000])
    bd = attack.backdoor_test_set(bundle.test)
    base = evaluate(model, bundle.test, bd)
    emit(out, {"kind": "sweep", "model": tag, "config": "none", "val_acc": accuracy(*predict(model, val)),
               "acc": base["acc"], "asr": base["asr"], "lcr": base["lcr"]})
    for name in names:
        if time.perf_counter() - T0 > budget_s:
            emit(out, {"kind": "skipped", "model": tag, "config": name, "why": "budget"})
            continue
        method, opts = SWEEP[name]
        d = defenses.create(method, "cifar10", **opts)
        t = time.perf_counter()
        try:
            p = d.purify(model, clean, progress=False)
        except PurificationDiverged as e:
            emit(out, {"kind": "sweep", "model": tag, "config": name, "diverged": str(e)})
            continue
        sync()
        wall = time.perf_counter() - t
        r = evaluate(p, bundle.test, bd)
        last = d.report["history"][-1]
        emit(out, {"kind": "sweep", "model": tag, "config": name, "val_acc": accuracy(*predict(p, val)),
                   "acc": r["acc"], "asr": r["asr"], "lcr": r["lcr"], "wall_s": wall,
                   "last_epoch": {k: v for k, v in last.items() if isinstance(v, (int, float))}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=500)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--train-epochs", type=int, default=40)
    ap.add_argument("--step-epochs", type=int, default=30, help="lr x0.1 after this many epochs")
    ap.add_argument("--width", type=int, default=16, help="width of the paper-style backdoored model")
    ap.add_argument("--configs", nargs="*", default=None, help="sweep only these configurations")
    ap.add_argument("--timing-last", action="store_true", help="time after the sweep (GPU warmed up)")
    ap.add_argument("--no-cached", action="store_true", help="skip the cached CPU-preset models")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    if args.smoke:
        bundle = load_data("synthetic", None, 0.2, 0, None)
        size, tw, te, n_clean, step, epochs = bundle.dataset_info["image_shape"][-1], 4, 2, 60, 1, 2
        for k in SWEEP:
            SWEEP[k][1]["epochs"] = 2
    else:
        bundle = load_data("cifar10", None, CPU_PRESET["reserve"], 0, None)
        size, tw, te, n_clean, step, epochs = 32, 64, 50, 500, args.step_epochs, args.train_epochs
    print(f"data ready in {time.perf_counter() - T0:.1f}s on {device}", flush=True)
    names = args.configs or list(SWEEP)
    if not args.timing_last:
        timing(out, bundle, device, tw, te, n_clean)
    width = args.width if not args.smoke else 4
    model, attack = paper_style_model(out, bundle, device, width, epochs, step, size)
    sweep(out, f"paper-style-badnets-w{width}", model, attack, bundle, names, args.budget_s, n_clean)
    if args.timing_last:
        timing(out, bundle, device, tw, te, n_clean)
    if args.smoke or args.no_cached:
        return
    for name in ["badnets", "blend", "trojan", "sig"]:
        path = model_path(name)
        if not path.exists():
            continue
        m, meta = load_model(path)
        sweep(out, f"cpu-preset-{name}", m.to(device), attacks.from_spec(meta["attack"]), bundle,
              list(SWEEP) if name == "badnets" else SHORT, args.budget_s, n_clean)


if __name__ == "__main__":
    sys.exit(main())
