"""Train every registered attack at the CPU preset and report ACC / ASR, flagging weak backdoors.

    python benchmarks/train_attack_suite.py [--datasets cifar10 gtsrb] [--attacks NAME ...]
        [--gtsrb-attacks NAME ...] [--data-root DIR] [--retrain]
        [--train-limit N] [--epochs E] [--out results/train_attack_suite] [--cache DIR]

* CIFAR-10: ``presets.CPU_PRESET`` (PreActResNet18 width 16, 10 epochs, one-cycle lr 0.1,
  5,000-image clean reserve) for EVERY name in ``fipurify.attacks.ATTACKS`` (so attacks
  registered later are included; ``custom`` is skipped: it needs a user pattern) and a
  clean model. Poison rates: ``presets.ATTACKS`` where listed, else the attack's default
  (0.1; clean-label SIG and CLB 0.8).
* GTSRB: the same preset on GTSRB for badnets, blend, trojan, wanet and dynamic, without
  horizontal flips (traffic signs are not mirror-symmetric) and with a 3% clean reserve
  (the paper's GTSRB validation share).

Attacks that need preparation (CLB's surrogate, the generator-based attacks) are prepared
by ``workflow.train_backdoored`` and cache their files under the fipurify cache. Models
are cached like ``train_attacks.py`` (``presets.model_path``, under ``--cache``); runs with
``--train-limit`` / ``--epochs`` get their own file names (and a 10% reserve instead of a
fixed 5,000 images). Writes ``<out>.json`` and
``<out>.md`` (default ``results/train_attack_suite``) with ACC, ASR, LCR, training time and
a flag for every backdoor below 90% ASR (per-component ASR for the combined attack).

Full scale is hours per attack on CPU (a CIFAR-10 epoch at the preset takes ~3 minutes on
one core). Smoke test: ``--train-limit 300 --epochs 1 --out /tmp/suite --cache /tmp/suite-models``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from presets import ATTACKS as PRESET_ATTACKS
from presets import CACHE, CPU_PRESET, RESULTS, model_path

from fipurify import attacks, load_model, save_model
from fipurify.io import atomic_write_text
from fipurify.metrics import format_table
from fipurify.training import TrainConfig
from fipurify.workflow import evaluate_saved, load_data, train_backdoored

ASR_FLAG = 0.90
GTSRB_ATTACKS = ("badnets", "blend", "trojan", "wanet", "dynamic")
GTSRB_PRESET = {**CPU_PRESET, "dataset": "gtsrb", "reserve": 0.03, "flip": False}
SKIP = ("custom",)  # needs a user-supplied trigger pattern


def suite_attacks() -> list[str]:
    """Every registered attack the suite can train without user input, plus the clean model."""
    return [name for name in attacks.ATTACKS if name not in SKIP] + ["clean"]


def _config(preset: dict) -> TrainConfig:
    return TrainConfig(epochs=preset["epochs"], lr=preset["lr"], schedule=preset["schedule"],
                       batch_size=preset["batch_size"], weight_decay=preset["weight_decay"], seed=preset["seed"],
                       eval_every=preset["epochs"], flip=preset.get("flip", True))


def _cached_path(name: str, preset: dict, cache: Path, train_limit: int | None) -> Path:
    path = cache / model_path(name, preset).name
    return path.with_name(f"{path.stem}_n{train_limit}{path.suffix}") if train_limit else path


def run_one(name: str, preset: dict, bundle, args) -> dict:
    """Train (or load the cached) model for one attack; return its result row."""
    path = _cached_path(name, preset, args.cache, args.train_limit)
    attack = None if name == "clean" else attacks.create(name, target=0, seed=preset["seed"],
                                                         **PRESET_ATTACKS.get(name, {}))
    if path.exists() and not args.retrain:
        model, meta = load_model(path)
        res = evaluate_saved(model, meta, bundle=bundle)
        seconds = meta.get("train_seconds")
        if attack is not None:
            attack = attacks.from_spec(meta["attack"])
        print(f"[{preset['dataset']}/{name}] cached {path.name}", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        model, meta = train_backdoored(bundle, preset["arch"], attack, _config(preset), width=preset["width"],
                                       progress=not args.quiet,
                                       log=lambda m: print(f"[{preset['dataset']}/{name}] {m}", file=sys.stderr))
        seconds = time.perf_counter() - t0
        meta["train_seconds"] = seconds
        save_model(model, path, meta)
        res = meta["metrics"]
    row = {"dataset": preset["dataset"], "attack": name, "acc": res["acc"], "asr": res["asr"],
           "lcr": res["lcr"], "train_s": seconds,
           "flag": None if res["asr"] is None else ("ASR<90%" if res["asr"] < ASR_FLAG else "")}
    if attack is not None and hasattr(attack, "component_metrics"):
        per = attack.component_metrics(model, attack.backdoor_test_set(bundle.test))
        row["components"] = per
        row["flag"] = ", ".join(f"{k} ASR<90%" for k, v in per.items() if v["asr"] < ASR_FLAG) or row["flag"]
    asr = "-" if res["asr"] is None else f"{100 * res['asr']:.2f}"
    print(f"[{preset['dataset']}/{name}] ACC {100 * res['acc']:.2f}  ASR {asr}", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["cifar10", "gtsrb"], choices=["cifar10", "gtsrb"])
    ap.add_argument("--attacks", nargs="+", default=None, help="CIFAR-10 attacks (default: all registered + clean)")
    ap.add_argument("--gtsrb-attacks", nargs="+", default=list(GTSRB_ATTACKS))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset (smoke tests)")
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (smoke tests)")
    ap.add_argument("--out", default=str(RESULTS / "train_attack_suite"), help="output path without suffix")
    ap.add_argument("--cache", type=Path, default=CACHE, help="folder for the trained models")
    args = ap.parse_args()
    plan = {"cifar10": (CPU_PRESET, args.attacks or suite_attacks()), "gtsrb": (GTSRB_PRESET, args.gtsrb_attacks)}
    unknown = sorted({n for d in args.datasets for n in plan[d][1]} - set(suite_attacks()))
    if unknown:
        ap.error(f"unknown attack(s) {', '.join(unknown)}; registered: {', '.join(suite_attacks())}")
    rows, presets_used = [], {}
    for ds in args.datasets:
        preset, names = plan[ds]
        preset = {**preset, **({"epochs": args.epochs} if args.epochs else {})}
        if args.train_limit and isinstance(preset["reserve"], int):
            preset["reserve"] = 0.1  # a fixed-size reserve would not fit a small subset
        presets_used[ds] = {**preset, "train_limit": args.train_limit}
        bundle = load_data(preset["dataset"], args.data_root, preset["reserve"], preset["seed"], args.train_limit)
        for name in names:
            rows.append(run_one(name, preset, bundle, args))
    flagged = [f"{r['dataset']}/{r['attack']}: {r['flag']}" for r in rows if r["flag"]]
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"presets": presets_used, "asr_flag_below": ASR_FLAG,
                                                            "rows": rows, "flagged": flagged}, indent=2))
    table = format_table(rows, ["dataset", "attack", "acc", "asr", "lcr", "train_s", "flag"])
    extra = [f"- {r['dataset']}/{r['attack']} {k}: ASR {100 * v['asr']:.2f}, LCR {100 * v['lcr']:.2f}"
             for r in rows for k, v in r.get("components", {}).items()]
    atomic_write_text(out.with_suffix(".md"), table + "\n" + ("\nPer component:\n" + "\n".join(extra) + "\n"
                                                              if extra else ""))
    print(table)
    if flagged:
        print("below 90% ASR: " + "; ".join(flagged))


if __name__ == "__main__":
    main()
