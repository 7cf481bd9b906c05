"""Train every attack at the CPU scale through the benchmark runner; report ACC / ASR and flag weak backdoors.

    python benchmarks/train_attack_suite.py [--datasets cifar10 gtsrb] [--jobs N] [--only PATTERN ...]
        [--db results/bench/results.sqlite] [--cache DIR] [--data-root DIR] [--report-only] [--dry-run]
        [--out results/attack_suite]

Runs the specs ``attacks`` (CIFAR-10: the paper's 14 attacks and a clean model, PreActResNet18
width 16, 10 epochs) and ``attacks-gtsrb`` (GTSRB: clean, BadNets, Blend, Trojan, WaNet,
Dynamic; WideResNet-16-1) with ``fipurify bench``: resumable, each model trained once and
cached, the same models the table specs purify. Then writes ``<out>.md`` / ``<out>.json``:
ACC, ASR, LCR and training time of every model, each backdoor under 90 % ASR flagged, and
the runs that failed or were not run yet. ``--only`` narrows the runs as in ``fipurify bench``
(e.g. ``--only wanet dyn-one``).

Full scale is 30-45 minutes per model on one CPU core (a CIFAR-10 epoch at the preset takes
~3-4 minutes); on a GPU add ``--device cuda``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fipurify.bench.commands import DEFAULT_DB, default_cache
from fipurify.bench.runner import BenchOptions, run_bench
from fipurify.bench.spec import load_spec
from fipurify.bench.store import ResultStore
from fipurify.io import atomic_write_text
from fipurify.metrics import format_table

ASR_FLAG = 0.90
SPECS = {"cifar10": "attacks", "gtsrb": "attacks-gtsrb"}
# Why a backdoor stays under 90% ASR at the CPU preset (PreActResNet18 width 16, 10 epochs),
# as diagnosed from the stored models; printed beside a flagged row.
REASONS = {
    ("cifar10", "troj-all"): "all-to-all: ten trigger->label maps to learn in 10 epochs (76% after 10)",
    ("cifar10", "dyn-all"): "all-to-all: ten sample-specific trigger->label maps to learn in 10 epochs",
    ("cifar10", "cba"): "composite trigger (two benign classes mixed) at the edge of learnable in 10 epochs",
    ("cifar10", "bppa"): "dithered 32-level quantisation contrasted with negative samples is not learned "
                         "at all in 10 epochs (ASR at the clean model's level); the paper trains far longer",
    ("cifar10", "lira"): "the learned trigger moves every pixel by only eps = 0.01 (2.55/255); a victim trained "
                         "from scratch on the fixed triggers for 10 epochs does not pick it up (LIRA trains the "
                         "victim jointly with the generator, then fine-tunes)",
}


def suite_rows(spec, store: ResultStore) -> list[dict]:
    """One row per attack of ``spec``: the stored no-defense result, or its status."""
    runs = [r for r in spec.runs() if r.defense == "none"]
    by_key = {r["run_key"]: r for r in store.rows([r.key for r in runs])}
    labels = spec.entry_labels().get("attack", {})
    out = []
    for run in runs:
        res = by_key.get(run.key)
        row = {"dataset": spec.data["name"], "attack": run.attack, "label": labels.get(run.attack, run.attack)}
        if res is None or res["status"] != "ok":
            row.update(status="not run" if res is None else "failed", error=(res or {}).get("error"))
        else:
            asr = res.get("asr")
            weak = asr is not None and asr < ASR_FLAG
            row.update(status="ok", acc=res["acc"], asr=asr, lcr=res.get("lcr"), train_s=res.get("train_seconds"),
                       trained_on=res.get("train_device") or "-", flag="ASR < 90%" if weak else "",
                       reason=REASONS.get((row["dataset"], run.attack), "not diagnosed") if weak else "")
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--only", nargs="+", default=[], metavar="PATTERN", help="as fipurify bench --only")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--db", type=Path, default=DEFAULT_DB)
    ap.add_argument("--cache", type=Path, default=None, help="model cache (default $FIPURIFY_CACHE/bench-models)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--report-only", action="store_true", help="only report what the database holds")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("results") / "attack_suite", help="output path without suffix")
    args = ap.parse_args()

    rows, failed = [], 0
    for ds in args.datasets:
        spec = load_spec(SPECS[ds])
        if not args.report_only:
            opts = BenchOptions(db=args.db, cache=args.cache or default_cache(), data_root=args.data_root,
                                jobs=args.jobs, threads=args.threads, device=args.device, only=args.only,
                                dry_run=args.dry_run)
            failed += run_bench(spec, opts, out=sys.stdout if args.dry_run else sys.stderr).get("failed", 0)
        if args.dry_run:
            continue
        with ResultStore(args.db) as store:
            rows += suite_rows(spec, store)
    if args.dry_run:
        return 0
    shown = [{**r, "acc": r.get("acc"), "asr": r.get("asr"), "lcr": r.get("lcr"), "train_s": r.get("train_s"),
              "flag": r.get("flag") or ("" if r["status"] == "ok" else r["status"])} for r in rows]
    table = format_table(shown, ["dataset", "label", "acc", "asr", "lcr", "train_s", "trained_on", "flag", "reason"])
    flagged = [f"{r['dataset']}/{r['attack']}" for r in rows if r.get("flag")]
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"asr_flag_below": ASR_FLAG, "rows": rows,
                                                                  "flagged": flagged}, indent=2))
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    if flagged:
        print("below 90% ASR: " + ", ".join(flagged))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
