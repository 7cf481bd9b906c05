"""The paper's Table 6 at the CPU preset: lambda_max, Tr(H), ASR, ACC before and after purification.

    python benchmarks/smoothness_table.py [--attacks badnets blend trojan sig] [--methods none ffip ft]
        [--n 200] [--clean-size 500] [--set KEY=VALUE ...] [--figures-dir docs/figures] [--resume]

For each cached backdoored model (benchmarks/train_attacks.py) and each method ("none" = the
backdoored model itself, "ffip", "ft", ...; library defaults with the CIFAR-10 schedule, the
same 500 clean reserve images, seed 0) the Hessian of the mean cross-entropy on ``--n`` clean
training images with their true labels (paper appendix A.2; the same images for every model)
gives lambda_max (Lanczos), Tr(H) (Hutchinson, +- standard error) and its eigenvalue density
(SLQ); ACC and ASR come from the full test set. A clean model of the same preset (trained by
``train_attacks.py --attacks clean`` if missing) gives the clean-vs-backdoored comparison
(paper Observation 1 / Fig. 1a-b).

Each row runs in its own process. Writes results/<out>.json and .md, and small PNG density
figures to --figures-dir: smoothness_<attack>.png (backdoored vs purified) and
sharpness_clean_vs_backdoored.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fipurify.cli import parse_key_values
from presets import ATTACKS, RESULTS, ROOT, model_path

METHODS = ["none", "ffip", "ft"]


def worker(attack: str, method: str, args: argparse.Namespace, options: dict) -> dict:
    """One row: (purify, then) measure smoothness and ACC/ASR, in this process."""
    from fipurify import analysis, defenses, load_model
    from fipurify.analysis.sample import draw_sample
    from fipurify.datasets import draw_clean_subset
    from fipurify.workflow import evaluate_saved, reload_data

    path = Path(args.clean_model) if attack == "clean" and args.clean_model else model_path(attack)
    model, meta = load_model(path)
    bundle = reload_data(meta, args.data_root)
    row: dict = {"attack": attack, "method": method, "n": args.n}
    t0 = time.perf_counter()
    if method != "none":
        clean = draw_clean_subset(bundle.reserve, args.clean_size, 0)
        model = defenses.create(method, dataset="cifar10", **options).purify(model, clean, progress=False)
        row["purify_s"] = time.perf_counter() - t0
    eval_meta = meta if meta.get("attack") or not args.asr_attack else {**meta, "attack": _attack_spec(args)}
    row.update({k: v for k, v in evaluate_saved(model, eval_meta, bundle=bundle).items() if k in ("acc", "asr", "lcr")})
    sample = draw_sample(bundle, "train", args.n, 0)
    t0 = time.perf_counter()
    rep = analysis.smoothness_report(model, sample, measures=("lambda_max", "trace", "density"),
                                     lanczos_steps=args.lanczos_steps, probes=args.probes,
                                     slq_runs=args.slq_runs, slq_steps=args.slq_steps, seed=0)
    row.update(lambda_max=rep.lambda_max, trace_h=rep.trace.value, trace_h_se=rep.trace.stderr,
               analysis_s=time.perf_counter() - t0, n_products=rep.n_products,
               ritz_values=[v.tolist() for v in rep.density.ritz_values],
               ritz_weights=[w.tolist() for w in rep.density.ritz_weights], dim=rep.density.dim)
    return row


def _attack_spec(args) -> dict:
    """The spec of the attack whose ASR a clean model is measured against (its trigger, unseen in training)."""
    from fipurify.io import read_metadata

    return read_metadata(model_path(args.asr_attack))["metadata"]["attack"]


def _ensure_clean(args) -> bool:
    """Train the clean model of the preset if it is not cached (train_attacks.py, attack 'none')."""
    if args.clean_model:
        return Path(args.clean_model).exists()
    if model_path("clean").exists():
        return True
    print("training the clean model of the CPU preset (train_attacks.py --attacks clean) ...", file=sys.stderr)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_attacks.py"), "--attacks", "clean", "--quiet"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    return subprocess.run(cmd).returncode == 0 and model_path("clean").exists()


def _panel(row: dict, title: str):
    from fipurify.analysis.density import smooth
    from fipurify.analysis.plot_density import DensityPanel

    import numpy as np
    dens = smooth([np.asarray(v) for v in row["ritz_values"]], [np.asarray(w) for w in row["ritz_weights"]], row["dim"])
    return DensityPanel(title, dens, row["lambda_max"], row["trace_h"], row["acc"], row["asr"])


def figures(rows: list[dict], out_dir: Path) -> list[str]:
    """Small PNGs: per attack backdoored vs purified; clean vs every backdoored model."""
    from fipurify.analysis.plot_density import plot_densities

    written = []
    by = {(r["attack"], r["method"]): r for r in rows}
    for attack in dict.fromkeys(r["attack"] for r in rows if r["attack"] != "clean"):
        panels = [_panel(by[(attack, m)], f"{attack}: {'backdoored' if m == 'none' else m}")
                  for m in METHODS + sorted({r['method'] for r in rows} - set(METHODS)) if (attack, m) in by]
        written += plot_densities(panels, out_dir / f"smoothness_{attack}", formats=("png",), dpi=72)
    if ("clean", "none") in by:
        panels = [_panel(by[("clean", "none")], "clean (benign)")]
        panels += [_panel(r, f"{r['attack']} (backdoored)") for r in rows if r["method"] == "none" and r["attack"] != "clean"]
        if len(panels) > 1:
            written += plot_densities(panels, out_dir / "sharpness_clean_vs_backdoored", formats=("png",), dpi=72)
    return [str(p) for p in written]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--n", type=int, default=200, help="clean training images for the Hessian")
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--lanczos-steps", type=int, default=20)
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--slq-runs", type=int, default=3)
    ap.add_argument("--slq-steps", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="defense option, repeatable")
    ap.add_argument("--no-clean", action="store_true", help="skip the clean-vs-backdoored comparison")
    ap.add_argument("--clean-model", default=None, help="use this clean model instead of the preset's")
    ap.add_argument("--asr-attack", default="badnets", help="attack whose trigger a clean model's ASR is measured with")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--figures-dir", default=str(ROOT / "docs" / "figures"))
    ap.add_argument("--out", default="smoothness_table")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in results/<out>.json")
    ap.add_argument("--worker", nargs=2, metavar=("ATTACK", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    options = parse_key_values(args.set)
    if args.worker:
        print(json.dumps(worker(*args.worker, args, options)))
        return
    from fipurify.io import atomic_write_text
    from fipurify.metrics import format_table

    out_json = RESULTS / f"{args.out}.json"
    rows = json.loads(out_json.read_text())["rows"] if args.resume and out_json.exists() else []
    jobs = [(a, m) for a in args.attacks for m in args.methods]
    if not args.no_clean and _ensure_clean(args):
        jobs.append(("clean", "none"))
    elif not args.no_clean:
        print("no clean model: skipping the clean-vs-backdoored comparison", file=sys.stderr)
    passthrough = sys.argv[1:]
    for attack, method in jobs:
        if any(r["attack"] == attack and r["method"] == method for r in rows):
            continue
        cmd = [sys.executable, __file__, *passthrough, "--worker", attack, method]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{attack}/{method} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        asr = "-" if row["asr"] is None else f"{100 * row['asr']:.2f}"
        print(f"{attack:8s} {method:6s} lambda_max {row['lambda_max']:.4g}  Tr(H) {row['trace_h']:.4g} "
              f"+- {row['trace_h_se']:.2g}  ASR {asr}  ACC {100 * row['acc']:.2f}  ({row['analysis_s']:.0f}s)",
              file=sys.stderr)
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_json, json.dumps({"options": options, "settings": _settings(args), "rows": rows}, indent=2))
    figs = figures(rows, Path(args.figures_dir)) if rows else []
    table = format_table(rows, ["attack", "method", "lambda_max", "trace_h", "trace_h_se", "asr", "acc"])
    atomic_write_text(RESULTS / f"{args.out}.md", table + "\n\nfigures: " + ", ".join(figs) + "\n")
    print(table)


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in ("n", "clean_size", "lanczos_steps", "probes", "slq_runs", "slq_steps")}


if __name__ == "__main__":
    main()
