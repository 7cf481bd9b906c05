"""Run one defense with several option sets on one cached model; print ACC / ASR and the per-epoch clean holdout.

    OMP_NUM_THREADS=1 python benchmarks/sweep_defense.py MODEL METHOD '{"epochs": 20}' '{"epochs": 20, "lr": 0.01}' ...
        [--clean-size 500] [--seed 0] [--out results/sweep.jsonl]

For choosing or checking a baseline's settings: every option set gets the same clean images
(``--clean-size`` drawn from the model's clean reserve with ``--seed``, as ``fipurify purify``
and the bench runner draw them). Each line of output (and of ``--out``) is one JSON record:
the options, test ACC / ASR, seconds, the defense's summary fields (mask statistics and the
like) and the clean holdout accuracy of every epoch by stage (teacher / student / ...), which
is what a clean-data-only choice may look at.

Used for the AWM and NAD settings in the README (``MODEL`` = the CPU-preset BadNets model).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fipurify import defenses
from fipurify.datasets import draw_clean_subset
from fipurify.io import load_model
from fipurify.purification import purify_model
from fipurify.workflow import reload_data

SUMMARY = ("mask_mean", "mask_below_half", "n_pruned", "trigger_l1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("method")
    ap.add_argument("options", nargs="+", help="JSON objects of config options, one run each")
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", type=Path, default=None, help="append the records to this JSON-lines file")
    args = ap.parse_args()

    model, meta = load_model(args.model)
    bundle = reload_data(meta, args.data_root)
    clean = draw_clean_subset(bundle.reserve, args.clean_size, args.seed)
    for text in args.options:
        kw = json.loads(text)
        d = defenses.create(args.method, **kw)
        # "before" = the metrics recorded at training time (not printed; saves an evaluation per run)
        result = purify_model(model, meta, d, clean, test=bundle, before=meta.get("metrics"))
        seconds, res = result.wall_seconds, result.after
        report = d.report
        holdout: dict[str, list] = {}
        for h in report.get("history", []):
            holdout.setdefault(h.get("stage", "main"), []).append(h.get("holdout_acc"))
        rec = {"model": str(args.model), "method": args.method, "options": kw, "acc": res["acc"], "asr": res["asr"],
               "seconds": round(seconds, 1), **{k: report[k] for k in SUMMARY if k in report and not isinstance(report[k], list)},
               "holdout_acc": holdout}
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
