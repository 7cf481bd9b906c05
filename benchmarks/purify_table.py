"""Purification table on the CPU CIFAR-10 preset: ASR, ACC, LCR, DER, wall time, peak memory.

    python benchmarks/purify_table.py [--attacks badnets blend trojan sig]
        [--methods none ft fip ffip ffip-no-trf ffip-no-lr | all] [--clean-size 500] [--set KEY=VALUE ...]
        [--resume] [--chart] [--out NAME]

``--methods all`` runs no defense and every registered post-training method (the
baselines and f-FIP). ``--resume`` keeps the rows already in results/NAME.json and runs
only the missing (attack, method) pairs. ``--chart`` also draws the mean wall time per
method as a bar chart (the paper's Figure 4) to results/NAME_runtime.png.

Uses the models cached by benchmarks/train_attacks.py. Every method gets the same 500
clean images (seed 0) from the model's clean reserve; hyper-parameters are the library
defaults (the same for every attack) unless --set overrides them. Each run is a separate
process so its peak memory can be measured. Writes results/purify_table.json and .md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from fipurify.cli import parse_key_values
from presets import ATTACKS, RESULTS, model_path

METHODS = ["none", "ft", "fip", "ffip", "ffip-no-trf", "ffip-no-lr"]


def worker(attack: str, method: str, clean_size: int, options: dict) -> dict:
    """One purification run in this process (:func:`fipurify.purification.purify_model`); returns its row."""
    from fipurify import defenses, load_model
    from fipurify.bench.stages import Meter
    from fipurify.datasets import draw_clean_subset
    from fipurify.purification import purify_model
    from fipurify.workflow import evaluate_saved, reload_data

    model, meta = load_model(model_path(attack))
    bundle = reload_data(meta)
    clean = draw_clean_subset(bundle.reserve, clean_size, 0)
    before = evaluate_saved(model, meta, bundle=bundle)
    row = {"attack": attack, "method": method, "clean_size": clean_size}
    if method == "none":
        return {**row, **before, "der": None, "seconds": 0.0, "epoch_s": None, "peak_mb": 0.0}
    d = defenses.create(method, dataset="cifar10", **options)
    meter = Meter("cpu")
    result = purify_model(model, meta, d, clean, test=bundle, before=before, meter=meter)
    hist = d.report["history"]
    return {**row, **result.after, "der": result.der, "seconds": result.wall_seconds,
            "epoch_s": sum(h["seconds"] for h in hist) / len(hist) if hist else None, "setup_s": d.report["seconds"]["setup"],
            "peak_mb": max(meter.peak - meter.base_rss, 0.0), "n_trainable": d.report["n_trainable"],
            "config": d.report["config"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--worker", nargs=2, metavar=("ATTACK", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="purify_table")
    ap.add_argument("--resume", action="store_true", help="keep finished rows of results/OUT.json")
    ap.add_argument("--chart", action="store_true", help="also draw results/OUT_runtime.png")
    ap.add_argument("--merge", nargs="+", default=None, metavar="NAME",
                    help="run nothing: combine results/NAME.json files (later ones win) into OUT")
    args = ap.parse_args()
    options = parse_key_values(args.set)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.clean_size, options)))
        return
    from fipurify.defenses import available
    from fipurify.io import atomic_write_text
    from fipurify.metrics import format_table

    methods = ["none"] + available() if args.methods == ["all"] else args.methods
    rows = []
    done: set[tuple[str, str]] = set()
    if args.resume and (RESULTS / f"{args.out}.json").exists():
        rows = json.loads((RESULTS / f"{args.out}.json").read_text())["rows"]
        done = {(r["attack"], r["method"]) for r in rows}
    if args.merge:
        merged: dict[tuple[str, str], dict] = {}
        for name in args.merge:
            for r in json.loads((RESULTS / f"{name}.json").read_text())["rows"]:
                merged[(r["attack"], r["method"])] = {**r, "source": name}
        rows = [merged[k] for k in sorted(merged, key=lambda k: (k[0], k[1] != "none", k[1]))]
        atomic_write_text(RESULTS / f"{args.out}.json", json.dumps({"options": options, "rows": rows}, indent=2))
        methods = []
    for attack in args.attacks:
        for method in methods:
            if (attack, method) in done:
                continue
            cmd = [sys.executable, __file__, "--worker", attack, method, "--clean-size", str(args.clean_size)]
            for kv in args.set:
                cmd += ["--set", kv]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{attack}/{method} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{attack:8s} {method:12s} ACC {100 * row['acc']:.2f}  ASR {100 * row['asr']:.2f}  "
                  f"LCR {100 * row['lcr']:.2f}  {row['seconds']:.0f}s", file=sys.stderr)
            RESULTS.mkdir(parents=True, exist_ok=True)
            atomic_write_text(RESULTS / f"{args.out}.json", json.dumps({"options": options, "rows": rows}, indent=2))
    table = format_table(rows, ["attack", "method", "acc", "asr", "lcr", "der", "seconds", "epoch_s", "peak_mb"])
    atomic_write_text(RESULTS / f"{args.out}.md", table + "\n")
    print(table)
    if args.chart:
        runtime_chart([r for r in rows if r["attack"] in args.attacks], RESULTS / f"{args.out}_runtime.png",
                      ", ".join(args.attacks))


def runtime_chart(rows: list[dict], path, attacks: str) -> None:
    """Mean purification wall time per method over ``attacks``, as a horizontal bar chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fipurify.io import atomic_output

    times: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] != "none":
            times.setdefault(r["method"], []).append(r["seconds"])
    names = sorted(times, key=lambda m: sum(times[m]) / len(times[m]))
    means = [sum(times[m]) / len(times[m]) for m in names]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1))
    ax.barh(names, means, color=["tab:red" if m == "ffip" else "tab:gray" for m in names])
    ax.set_xlabel("purification wall time, s (mean over attacks)")
    ax.set_title(f"Runtime per defense (CPU preset, 500 clean images; {attacks})")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
