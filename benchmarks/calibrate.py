"""Calibrate purification settings on one backdoored model, selecting on clean data only.

    python benchmarks/calibrate.py MODEL --grid '{"method": "ffip", "lr": [0.01, 0.05]}' [--clean-size 500]

From the model's clean reserve it draws the purification set (``--clean-size``, seed 0)
and a disjoint clean *validation* set (``--val-size``, default 1000). Every grid point is
purified, then reported with its clean-validation accuracy (the only figure a selection
rule may use) and, for the record, test ACC and ASR. Appends JSON lines to
results/calibration.jsonl.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np
import torch

from presets import RESULTS

from fipurify import defenses, load_model
from fipurify.datasets import draw_clean_subset
from fipurify.metrics import accuracy, format_table, predict
from fipurify.workflow import evaluate_saved, reload_data


def expand(grid: dict) -> list[dict]:
    keys = list(grid)
    vals = [v if isinstance(v, list) else [v] for v in grid.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*vals)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--grid", action="append", required=True, help="JSON dict; lists are expanded")
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_model(args.model)
    bundle = reload_data(meta, args.data_root)
    clean, used = draw_clean_subset(bundle.reserve, args.clean_size, 0, return_indices=True)
    # The validation images are reserve images not drawn for purification.
    rest = np.setdiff1d(np.arange(len(bundle.reserve)), used)
    val = bundle.reserve.subset(np.random.default_rng(1).permutation(rest)[:args.val_size])
    base_val = accuracy(*predict(model, val))
    base = evaluate_saved(model, meta, bundle=bundle)
    rows = [{"config": "none", "val_acc": base_val, "acc": base["acc"], "asr": base["asr"], "seconds": 0.0}]
    print(f"no defense: val {100 * base_val:.2f}  ACC {100 * base['acc']:.2f}  ASR {100 * base['asr']:.2f}", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for grid in args.grid:
        for point in expand(json.loads(grid)):
            opts = dict(point)
            method = opts.pop("method", "ffip")
            t0 = time.perf_counter()
            d = defenses.create(method, dataset="cifar10", **opts)
            try:
                out = d.purify(model, clean, progress=False)
            except defenses.PurificationDiverged as e:
                print(f"{point}: diverged ({e})", file=sys.stderr)
                continue
            secs = time.perf_counter() - t0
            val_acc = accuracy(*predict(out, val))
            res = evaluate_saved(out, meta, bundle=bundle)
            h = d.report["history"][-1]
            row = {"config": json.dumps(point), "val_acc": val_acc, "acc": res["acc"], "asr": res["asr"],
                   "seconds": secs, "ce": h.get("ce"), "trf": h.get("trf")}
            rows.append(row)
            print(f"{point}: val {100 * val_acc:.2f}  ACC {100 * res['acc']:.2f}  ASR {100 * res['asr']:.2f}  "
                  f"({secs:.0f}s)", file=sys.stderr)
            with open(RESULTS / "calibration.jsonl", "a") as f:
                f.write(json.dumps({"model": args.model, "tag": args.tag, **row, "report": {
                    k: v for k, v in d.report.items() if k != "config"}}) + "\n")
    print(format_table(rows, ["config", "val_acc", "acc", "asr", "seconds"]))


if __name__ == "__main__":
    main()
