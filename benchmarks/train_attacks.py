"""Train the backdoored models of the CPU CIFAR-10 preset and report ACC / ASR per attack.

    python benchmarks/train_attacks.py [--attacks badnets blend trojan sig clean] [--data-root DIR]

Models are cached under cache/models/ (reused by the purification benchmarks; pass
--retrain to redo them). Writes results/train_attacks.json and results/train_attacks.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from presets import ATTACKS, CPU_PRESET, RESULTS, model_path

from fipurify import attacks, load_model, save_model
from fipurify.io import atomic_write_text
from fipurify.metrics import format_table
from fipurify.training import TrainConfig
from fipurify.workflow import evaluate_saved, load_data, train_backdoored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    p = CPU_PRESET
    bundle = load_data(p["dataset"], args.data_root, p["reserve"], p["seed"])
    cfg = TrainConfig(epochs=p["epochs"], lr=p["lr"], schedule=p["schedule"], batch_size=p["batch_size"],
                      weight_decay=p["weight_decay"], seed=p["seed"], eval_every=p["epochs"])
    rows = []
    for name in args.attacks:
        path = model_path(name)
        if path.exists() and not args.retrain:
            model, meta = load_model(path)
            res = evaluate_saved(model, meta, bundle=bundle)
            seconds = meta.get("train_seconds")
            print(f"{name}: cached {path.name}", file=sys.stderr)
        else:
            attack = None if name == "clean" else attacks.create(name, target=0, seed=p["seed"], **ATTACKS[name])
            t0 = time.perf_counter()
            model, meta = train_backdoored(bundle, p["arch"], attack, cfg, width=p["width"],
                                           progress=not args.quiet, log=lambda m: print(f"[{name}] {m}", file=sys.stderr))
            seconds = time.perf_counter() - t0
            meta["train_seconds"] = seconds
            save_model(model, path, meta)
            res = meta["metrics"]
        rows.append({"attack": name, "acc": res["acc"], "asr": res["asr"], "train_s": seconds,
                     "asr_ok": None if res["asr"] is None else res["asr"] >= 0.95})
        asr = "-" if res["asr"] is None else f"{100 * res['asr']:.2f}"
        print(f"{name}: ACC {100 * res['acc']:.2f}  ASR {asr}", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "train_attacks.json", json.dumps({"preset": p, "rows": rows}, indent=2))
    table = format_table(rows, ["attack", "acc", "asr", "train_s"])
    atomic_write_text(RESULTS / "train_attacks.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
