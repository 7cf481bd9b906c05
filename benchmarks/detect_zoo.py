"""Backdoor detection table over a zoo of saved models: detected?, target correct?, score, proxy ASR, time.

    python benchmarks/detect_zoo.py [FOLDER ...] [--methods neural-cleanse uap] [--clean-size 500]
        [--seed 0] [--set KEY=VALUE ...] [--data-root R] [--limit N] [--out results/detect_zoo]

FOLDER defaults to fipurify bench's model cache (``$FIPURIFY_CACHE/bench-models``, else
``~/.cache/fipurify/bench-models``); every ``*.safetensors`` in it is one model. Each
detector sees ``--clean-size`` images (seed ``--seed``, stratified) of the model's clean
reserve only: never the test set or the attack. The truth (attack, target, ASR) comes
from the model file's metadata (``attack``, ``metrics``) and is used only to score the
rows: for a backdoored all-to-one model "detected" means flagged and "target ok" means the
suspected target is the attack's; for a clean model (no attack), "detected" is a false
positive; all-to-all models have no single target. Writes OUT.json (rows + summary) and
OUT.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def default_folder() -> Path:
    cache = os.environ.get("FIPURIFY_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "fipurify") / "bench-models"


def truth(meta: dict[str, Any]) -> dict[str, Any]:
    attack = meta.get("attack") or {}
    metrics = meta.get("metrics") or {}
    return {"attack": attack.get("name", "none"), "mode": attack.get("mode"),
            "true_target": attack.get("target") if attack and attack.get("mode", "all2one") == "all2one" else None,
            "true_asr": metrics.get("asr"), "acc": metrics.get("acc")}


def run_model(path: Path, methods: list[str], clean_size: int, seed: int, options: dict[str, Any],
              data_root: str | None) -> list[dict[str, Any]]:
    """One row per detector for the model file ``path``."""
    import warnings

    from fipurify import detect, load_model
    from fipurify.datasets import draw_clean_subset
    from fipurify.workflow import reload_data

    model, meta = load_model(path)
    reserve = reload_data(meta, data_root).reserve
    clean = draw_clean_subset(reserve, min(clean_size, len(reserve)), seed)
    t = truth(meta)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = detect(model, clean, method=method, seed=seed, **options)
        backdoored_truth = t["attack"] != "none"
        rows.append({"model": path.name, **t, "method": method, "n_clean": len(clean),
                     "flagged": rep.backdoored, "suspected_target": rep.target, "candidate": rep.candidate,
                     "detected": rep.backdoored if backdoored_truth else None,
                     "false_positive": None if backdoored_truth else rep.backdoored,
                     "target_correct": (rep.target == t["true_target"]) if t["true_target"] is not None else None,
                     "score": rep.to_dict()["score"], "threshold": rep.threshold, "proxy_asr": rep.proxy_asr,
                     "seconds": time.perf_counter() - t0, "warnings": rep.warnings})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        bd = [r for r in mine if r["detected"] is not None]
        clean = [r for r in mine if r["false_positive"] is not None]
        tgt = [r for r in mine if r["target_correct"] is not None]
        out[method] = {"n_models": len(mine),
                       "detection_rate": sum(r["detected"] for r in bd) / len(bd) if bd else None,
                       "target_accuracy": sum(r["target_correct"] for r in tgt) / len(tgt) if tgt else None,
                       "false_positive_rate": sum(r["false_positive"] for r in clean) / len(clean) if clean else None,
                       "mean_seconds": sum(r["seconds"] for r in mine) / len(mine) if mine else None}
    return out


def markdown(rows: list[dict[str, Any]], summ: dict[str, Any]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def yn(v):
        return "-" if v is None else ("yes" if v else "no")

    lines = ["| model | attack | true target | true ASR % | method | flagged | suspected | target ok | score | "
             "proxy ASR % | seconds |", "|" + "---|" * 11]
    for r in rows:
        score = r["score"] if isinstance(r["score"], str) else f"{r['score']:.2f}"
        lines.append(f"| {r['model']} | {r['attack']} | {r['true_target'] if r['true_target'] is not None else '-'} | "
                     f"{pct(r['true_asr'])} | {r['method']} | {yn(r['flagged'])} | "
                     f"{r['suspected_target'] if r['suspected_target'] is not None else '-'} | {yn(r['target_correct'])} | "
                     f"{score} | {pct(r['proxy_asr'])} | {r['seconds']:.1f} |")
    lines += ["", "| method | models | detection rate % | target accuracy % | false-positive rate % | mean seconds |",
              "|---|---|---|---|---|---|"]
    for m, s in summ.items():
        lines.append(f"| {m} | {s['n_models']} | {pct(s['detection_rate'])} | {pct(s['target_accuracy'])} | "
                     f"{pct(s['false_positive_rate'])} | {s['mean_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from fipurify.cli import parse_key_values
    from fipurify.io import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", help="folders of fipurify model files (default: the bench model cache)")
    p.add_argument("--methods", nargs="+", default=["neural-cleanse", "uap"], help="detectors (default both)")
    p.add_argument("--clean-size", type=int, default=500, help="clean reserve images per model (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clean subset and detectors (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="detector option for every method (JSON value), repeatable (default: none)")
    p.add_argument("--data-root", default=None, help="dataset root (default: $FIPURIFY_DATA, then ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="only the first N models (default: all)")
    p.add_argument("--out", default="results/detect_zoo", help="output stem for .json and .md (default results/detect_zoo)")
    args = p.parse_args(argv)
    folders = [Path(f).expanduser() for f in args.folders] or [default_folder()]
    files = sorted(f for folder in folders for f in folder.glob("*.safetensors"))[:args.limit]
    if not files:
        print(f"no *.safetensors model files in {', '.join(map(str, folders))}", file=sys.stderr)
        return 2
    options = {k.replace("-", "_"): v for k, v in parse_key_values(args.set).items()}
    rows = []
    for f in files:
        print(f"{f.name}", file=sys.stderr)
        for r in run_model(f, args.methods, args.clean_size, args.seed, options, args.data_root):
            rows.append(r)
            print(f"  {r['method']}: flagged {r['flagged']}, suspected {r['suspected_target']} "
                  f"(true {r['true_target']}), score {r['score']}, proxy ASR {r['proxy_asr']}, "
                  f"{r['seconds']:.1f}s", file=sys.stderr)
    summ = summary(rows)
    doc = {"config": {"methods": args.methods, "clean_size": args.clean_size, "seed": args.seed, "options": options,
                      "folders": [str(f) for f in folders]}, "rows": rows, "summary": summ}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown(rows, summ))
    print(markdown(rows, summ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
