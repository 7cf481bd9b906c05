"""The ``fipurify`` command line: train, evaluate, purify, demo.

Every error caused by input (files, data, options) ends the command with one readable
line on stderr and exit status 2; outputs are written atomically or not at all.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import FipurifyError

#: Modules adding sub-commands: each has ``register(subparsers)`` which adds its parsers
#: with ``set_defaults(func=...)``; the function returns the exit status.
COMMAND_MODULES: tuple[str, ...] = ("fipurify.bench.commands", "fipurify.analysis.commands")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $FIPURIFY_DATA, then ../shared/data)")


def parse_key_values(items: Sequence[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict; each value is read as JSON, else kept as a string."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise FipurifyError(f"{flag} takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def cmd_train(args) -> int:
    from . import attacks, models
    from .io import atomic_write_text, save_model
    from .training import TrainConfig
    from .workflow import load_data, train_backdoored

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
                      weight_decay=args.weight_decay, seed=args.seed, flip=not args.no_flip,
                      eval_every=args.eval_every, smoothness_penalty=args.smoothness_penalty).validate()
    models.canonical_name(args.arch)  # fail on a bad name before loading any data
    attack = None
    if args.attack != "none":
        attack = attacks.create(args.attack, target=args.target, poison_rate=args.poison_rate,
                                seed=args.seed, **({"mode": args.mode} if args.mode else {}),
                                **parse_key_values(args.attack_opt, "--attack-opt"))
    defense = _training_defense(args)
    bundle = load_data(args.dataset, args.data_root, _reserve(args.reserve), args.seed, args.train_limit)
    if attack is not None and not 0 <= args.target < bundle.dataset_info["num_classes"]:
        raise FipurifyError(f"target label {args.target} is out of range for "
                            f"{bundle.dataset_info['num_classes']} classes")
    print(f"training {args.arch} on {bundle.dataset_info['name']}: {len(bundle.train)} training images, "
          f"{len(bundle.reserve)} held out as clean reserve, attack: {args.attack}"
          + (f", training-time defense: {args.defense}" if defense is not None else ""), file=sys.stderr)
    model, meta = train_backdoored(bundle, args.arch, attack, cfg, width=args.width,
                                   progress=_progress(args), log=lambda m: print(m, file=sys.stderr),
                                   defense=defense)
    save_model(model, args.out, meta)
    m = meta["metrics"]
    print(f"saved {args.out}: ACC {100 * m['acc']:.2f}%" + (f", ASR {100 * m['asr']:.2f}%" if m["asr"] is not None else ""))
    if args.json:
        atomic_write_text(args.json, json.dumps(meta, indent=2))
    return 0


def _training_defense(args):
    """The training-time defense named by ``--defense`` (None for 'none'), built before any data loads."""
    if args.defense.lower() == "none":
        if args.defense_opt:
            raise FipurifyError("--defense-opt needs --defense")
        return None
    from .defenses.training_time import create_training_defense
    if getattr(args, "smoothness_penalty", 0.0):
        raise FipurifyError("--smoothness-penalty cannot be combined with --defense")
    options = {"seed": args.seed, "flip": not args.no_flip, **_parse_options(args.defense_opt, "--defense-opt")}
    return create_training_defense(args.defense, **options)


def _reserve(v: str) -> int | float:
    f = float(v)
    return int(f) if f >= 1 else f


def cmd_evaluate(args) -> int:
    from .io import atomic_write_text, load_model
    from .metrics import format_table
    from .workflow import evaluate_saved

    model, meta = load_model(args.model)
    res = evaluate_saved(model, meta, args.data_root)
    row = {"model": Path(args.model).name, **res}
    print(format_table([row], ["model", "acc", "asr", "lcr", "n_clean", "n_backdoor"]))
    if args.json:
        atomic_write_text(args.json, json.dumps(row, indent=2))
    return 0


def _parse_options(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    out = parse_key_values(items, flag)
    return {k.replace("-", "_"): v for k, v in out.items()}


def _clean_set(args, meta: dict[str, Any]):
    """The clean purification set: a user's image folder, or N images from the model's clean reserve."""
    from . import datasets
    from .workflow import reload_data

    if args.clean_dir:
        shape = meta.get("dataset", {}).get("image_shape")
        classes = meta.get("dataset", {}).get("classes")
        data = datasets.load("imagefolder", root=args.clean_dir, split=None, classes=classes,
                             size=shape[1:] if shape else None)
    else:
        data = reload_data(meta, args.data_root).reserve
    n = args.clean_size if args.clean_size is not None else len(data)
    return datasets.draw_clean_subset(data, n, args.seed)


def cmd_purify(args) -> int:
    from . import defenses
    from .io import atomic_write_text, load_model, save_model
    from .metrics import defense_effectiveness_rate, format_table
    from .workflow import evaluate_saved, reload_test_only

    model, meta = load_model(args.model)
    options = _parse_options(args.set)
    for key in ("epochs", "lr", "eta_f", "eta_r"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    options.setdefault("seed", args.seed)
    ds_name = meta.get("dataset", {}).get("name")
    defense = defenses.create(args.method, dataset=ds_name if ds_name in defenses.PAPER_PRESETS else None, **options)
    clean = _clean_set(args, meta)
    print(f"purifying {Path(args.model).name} with {args.method} on {len(clean)} clean images", file=sys.stderr)

    def log(rec: dict[str, Any]) -> None:
        terms = "  ".join(f"{k} {rec[k]:.4f}" for k in ("ce", "trf", "lr") if k in rec)
        acc = f"  holdout-acc {100 * rec['holdout_acc']:.2f}" if "holdout_acc" in rec else ""
        print(f"epoch {rec['epoch']:3d}  {terms}{acc}  ({rec['seconds']:.2f}s)", file=sys.stderr)

    purified = defense.purify(model, clean, progress=_progress(args), callback=None if args.quiet else log)
    report = {"model": str(args.model), "clean_size": len(clean), **defense.report}
    if not args.no_eval and meta.get("dataset"):
        test_data = reload_test_only(meta, args.data_root)  # load the test set once for both
        before = evaluate_saved(model, meta, bundle=test_data)
        after = evaluate_saved(purified, meta, bundle=test_data)
        report["before"], report["after"] = before, after
        rows = [{"model": "before", **before}, {"model": "after", **after}]
        if before["asr"] is not None:
            rows[1]["der"] = defense_effectiveness_rate(before, after)
        print(format_table(rows, ["model", "acc", "asr", "lcr", "der"]))
    new_meta = {k: v for k, v in meta.items() if k not in ("arch", "arch_kwargs", "history")}
    new_meta["purification"] = {k: v for k, v in report.items() if k != "history"}
    save_model(purified, args.out, new_meta)
    atomic_write_text(args.report or str(Path(args.out).with_suffix(".json")), json.dumps(report, indent=2))
    print(f"saved {args.out} ({report['seconds']['total']:.1f}s)")
    return 0


def cmd_demo(args) -> int:
    """Train a small backdoored model, purify it, and evaluate before and after."""
    import time

    from . import attacks, datasets, defenses
    from .errors import DataError
    from .metrics import defense_effectiveness_rate, evaluate, format_table
    from .training import TrainConfig
    from .workflow import load_data, train_backdoored

    t_start = time.perf_counter()
    name = args.dataset
    if name == "cifar10":
        try:
            datasets.resolve_root(args.data_root)
            bundle = load_data("cifar10", args.data_root, 1000, args.seed, args.train_limit)
        except DataError as e:
            print(f"CIFAR-10 not available ({e}); running the demo on synthetic data instead", file=sys.stderr)
            name = "synthetic"
    if name == "synthetic":
        bundle = load_data("synthetic", None, 0.25, args.seed, None, n=2000, num_classes=4, image_size=16)
    # No crop/flip in the demo: on a short run the random crop often cuts the corner trigger
    # off, and the backdoor is not learned in time (the benchmarks train with augmentation).
    cfg = TrainConfig(epochs=args.epochs, lr=0.1 if name == "cifar10" else 0.05, seed=args.seed,
                      eval_every=args.epochs, augment=False, batch_size=128 if name == "cifar10" else 32)
    attack = attacks.create(args.attack, target=0, seed=args.seed, poison_rate=args.poison_rate)
    print(f"[1/3] training a width-{args.width} PreActResNet18 on {len(bundle.train)} {name} images "
          f"with the {args.attack} backdoor ({args.epochs} epochs)", file=sys.stderr)
    model, _ = train_backdoored(bundle, "preactresnet18", attack, cfg, width=args.width,
                                progress=_progress(args), log=lambda m: print("      " + m, file=sys.stderr))
    clean = datasets.draw_clean_subset(bundle.reserve, min(args.clean_size, len(bundle.reserve)), args.seed)
    print(f"[2/3] purifying with {args.method} on {len(clean)} clean images from the reserve", file=sys.stderr)
    defense = defenses.create(args.method, dataset="cifar10", seed=args.seed)
    purified = defense.purify(model, clean, progress=_progress(args))
    print("[3/3] evaluating on the test set", file=sys.stderr)
    bd = attack.backdoor_test_set(bundle.test)
    before, after = evaluate(model, bundle.test, bd), evaluate(purified, bundle.test, bd)
    rows = [{"model": "backdoored", **before},
            {"model": f"purified ({args.method})", **after, "der": defense_effectiveness_rate(before, after)}]
    print(format_table(rows, ["model", "acc", "asr", "lcr", "der"]))
    print(f"total {time.perf_counter() - t_start:.0f}s (purification {defense.report['seconds']['total']:.0f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="fipurify", description="Remove backdoors from trained PyTorch models.")
    p.add_argument("--version", action="version", version=f"fipurify {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a clean or backdoored model")
    t.add_argument("--dataset", default="cifar10", help="cifar10, gtsrb, synthetic (default cifar10)")
    _add_data_args(t)
    t.add_argument("--arch", default="preactresnet18")
    t.add_argument("--width", type=int, default=None, help="width multiplier base (preactresnet18: 64 = paper)")
    t.add_argument("--attack", default="badnets", help="attack name, or 'none' for a clean model")
    t.add_argument("--target", type=int, default=0)
    t.add_argument("--poison-rate", type=float, default=None, help="share of eligible images poisoned (default: the attack's own, 0.1; SIG 0.8)")
    t.add_argument("--mode", default=None, choices=["all2one", "all2all"],
                   help="all2one (default) or all2all; aliases such as troj-all or dyn-all set it themselves")
    t.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra attack option (JSON value), repeatable")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--schedule", default="onecycle")
    t.add_argument("--no-flip", action="store_true", help="no horizontal flips (e.g. traffic signs)")
    t.add_argument("--reserve", default="0.1", help="clean reserve held out of training: count or fraction")
    t.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of this size")
    t.add_argument("--eval-every", type=int, default=1)
    t.add_argument("--defense", default="none",
                   help="train through a training-time defense: abl or cbd (default none); it follows its own "
                        "paper schedule, so --epochs/--lr/--batch-size/--weight-decay/--schedule do not apply: "
                        "set its options with --defense-opt (e.g. isolation_epochs=, finetune_epochs=, "
                        "unlearn_epochs= for abl; epochs=, backdoor_epochs=, mi_weight= for cbd)")
    t.add_argument("--defense-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the training-time defense (JSON value), repeatable")
    t.add_argument("--smoothness-penalty", type=float, default=0.0, metavar="ETA_F",
                   help="adaptive attack: add ETA_F * Tr(F) to the training loss (paper eq. 5; default 0 = off)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="output .safetensors file")
    t.add_argument("--json", default=None, help="also write the metadata and history as JSON")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="ACC, ASR and LCR of a saved model on its dataset and attack")
    e.add_argument("model")
    _add_data_args(e)
    e.add_argument("--json", default=None, help="write the numbers as JSON")
    e.set_defaults(func=cmd_evaluate)

    u = sub.add_parser("purify", help="remove a backdoor with f-FIP (default) or another method")
    u.add_argument("model")
    u.add_argument("--method", default="ffip",
                   help="ffip (default), fip, ft, ffip-no-trf, ffip-no-lr; baselines with their papers' "
                        "defaults: ft-sam (--set rho=, adaptive=), fp (acc_drop=, prune_ratio=, layer=), "
                        "nad (betas=, layers=, teacher_epochs=), mcr (t=, ft_epochs=), clp (u=; data-free), "
                        "anp (eps=, alpha=, threshold=), i-bau (fixed_point_steps=, pert_norm=), awm (alpha=, beta=), "
                        "rnp (clean_threshold=, prune_threshold=)")
    u.add_argument("--clean-size", type=int, default=None,
                   help="clean images drawn from the model's clean reserve (default: the whole reserve)")
    u.add_argument("--clean-dir", default=None, help="use your own clean images: a folder of class/*.png")
    _add_data_args(u)
    u.add_argument("--epochs", type=int, default=None)
    u.add_argument("--lr", type=float, default=None)
    u.add_argument("--eta-f", type=float, default=None, help="weight of the Fisher-trace penalty")
    u.add_argument("--eta-r", type=float, default=None, help="weight of the clean-Fisher anchor L_r")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method's config (JSON value), repeatable")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--out", required=True, help="output .safetensors file")
    u.add_argument("--report", default=None, help="JSON report path (default: OUT with .json)")
    u.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation on the test set")
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(func=cmd_purify)

    d = sub.add_parser("demo", help="train a small backdoored model, purify it, evaluate before and after")
    d.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    _add_data_args(d)
    d.add_argument("--attack", default="blend", help="blend (default: learned within a short run), badnets, trojan, sig")
    d.add_argument("--poison-rate", type=float, default=0.1, help="share of eligible images poisoned")
    d.add_argument("--width", type=int, default=8)
    d.add_argument("--epochs", type=int, default=6)
    d.add_argument("--train-limit", type=int, default=10000, help="training images used (seeded subset)")
    d.add_argument("--clean-size", type=int, default=500)
    d.add_argument("--method", default="ffip")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FipurifyError as e:
        if args.debug:
            raise
        print(f"fipurify: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"fipurify: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("fipurify: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
