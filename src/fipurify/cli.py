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

from .command_args import (
    _add_data_args, parse_key_values, _progress, _add_device_arg, _device,
    _add_model_args, _open_model, _model_label,
    _check_model_inputs, _check_out, _parse_options, _clean_set)
from .errors import FipurifyError

#: Modules adding sub-commands: each has ``register(subparsers)`` which adds its parsers
#: with ``set_defaults(func=...)``; the function returns the exit status.
COMMAND_MODULES: tuple[str, ...] = ("fipurify.bench.commands", "fipurify.analysis.commands",
                                    "fipurify.detection.commands")


def cmd_train(args) -> int:
    from . import attacks, models
    from .io import atomic_write_text, save_model
    from .training import TrainConfig
    from .workflow import load_data, train_backdoored

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
                      weight_decay=args.weight_decay, seed=args.seed, flip=not args.no_flip,
                      eval_every=args.eval_every, smoothness_penalty=args.smoothness_penalty).validate()
    models.canonical_name(args.arch)  # fail on a bad name before loading any data
    device = _device(args)
    _check_out(args, args.out)
    _check_out(args, args.json, "--json")
    attack = None
    attack_opts = parse_key_values(args.attack_opt, "--attack-opt")
    if args.attack != "none":
        # --attack-opt target=... wins over --target (e.g. the trigger-word attack's output sentence)
        attack = attacks.create(args.attack, **({} if "target" in attack_opts else {"target": args.target}),
                                poison_rate=args.poison_rate, seed=args.seed,
                                **({"mode": args.mode} if args.mode else {}), **attack_opts)
    defense = _training_defense(args)
    if args.resume and defense is not None:
        raise FipurifyError("--resume applies to plain training; a training-time defense follows its own schedule")
    arch_kw = _parse_options(args.arch_opt, "--arch-opt")
    load_kw = _parse_options(args.dataset_opt, "--dataset-opt")
    bundle = load_data(args.dataset, args.data_root, _reserve(args.reserve), args.seed, args.train_limit, **load_kw)
    n_classes = bundle.dataset_info.get("num_classes")
    target = getattr(attack, "target", None)
    if attack is not None and n_classes is not None and isinstance(target, int) and not 0 <= target < n_classes:
        raise FipurifyError(f"target label {target} is out of range for {n_classes} classes")
    what = "images" if "image_shape" in bundle.dataset_info else "items"
    print(f"training {args.arch} on {bundle.dataset_info['name']}: {len(bundle.train)} training {what}, "
          f"{len(bundle.reserve)} held out as clean reserve, attack: {args.attack}"
          + (f", training-time defense: {args.defense}" if defense is not None else ""), file=sys.stderr)
    from . import train_state

    state = train_state.beside(args.out) if args.resume else None
    model, meta = train_backdoored(bundle, args.arch, attack, cfg, width=args.width,
                                   progress=_progress(args), log=lambda m: print(m, file=sys.stderr),
                                   defense=defense, device=device, checkpoint=state, **arch_kw)
    meta["device"] = device  # where it was trained
    save_model(model, args.out, meta)
    if state is not None:
        state.unlink(missing_ok=True)
    m = meta["metrics"]
    name = {"accuracy": "ACC", "BLEU": "CT BLEU"}.get(m.get("metric", "accuracy"), m.get("metric"))
    print(f"saved {args.out}: {name} {100 * m['acc']:.2f}%"
          + (f", ASR {100 * m['asr']:.2f}%" if m["asr"] is not None else ""))
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
    from .io import atomic_write_text
    from .metrics import format_table
    from .workflow import evaluate_saved

    _check_model_inputs(args)
    _check_out(args, args.json, "--json")
    model, meta = _open_model(args)
    if not meta.get("dataset"):
        raise FipurifyError(f"{_model_label(args)} records no dataset to evaluate it on: give your own model's "
                            "--dataset (cifar10, gtsrb), or evaluate it in Python with fipurify.metrics.evaluate")
    res = evaluate_saved(model, meta, args.data_root)
    row = {"model": _model_label(args), **res}
    print(format_table([row], ["model", *metric_columns(res), "n_clean", "n_backdoor"]))
    if args.json:
        atomic_write_text(args.json, json.dumps(row, indent=2))
    return 0


def metric_columns(result: dict[str, Any] | None) -> list[str]:
    """The table columns of a task's metrics (:func:`fipurify.metrics.evaluate_task`): acc, asr, lcr
    for classifiers; mAP and asr for multi-label models; CT, AT and ASR for translation."""
    metric = (result or {}).get("metric")
    if metric == "BLEU":
        return ["CT", "AT", "ASR"]
    if metric is not None:
        return [metric, "asr"]
    return ["acc", "asr", "lcr"]


def _check_task(args, defense, meta: dict[str, Any]) -> None:
    """A one-line refusal, before any data is read, when ``defense`` cannot act on the model's task
    or ``--clean-dir`` (a folder of images) cannot hold its clean data."""
    task = (meta.get("dataset") or {}).get("task")
    if task:
        defense.use_task(task)
    if args.clean_dir and task not in (None, "image-classification"):
        raise FipurifyError(f"--clean-dir takes folders of images; this is a {task} model: leave --clean-dir "
                            "out to use its clean reserve")


def cmd_purify(args) -> int:
    from .errors import DataError
    from .io import atomic_write_text, save_model
    from .metrics import format_table
    from .purification import defense_for, purify_model
    from .workflow import reload_test_only

    _check_model_inputs(args)
    report_path = args.report or str(Path(args.out).with_suffix(".json"))
    _check_out(args, args.out)
    _check_out(args, report_path, "--report")
    if Path(report_path).expanduser().resolve() == Path(args.out).expanduser().resolve():
        raise FipurifyError(f"--report {report_path} is the --out file; name another file")
    model, meta = _open_model(args)
    if not args.no_eval and not meta.get("dataset"):
        raise FipurifyError(f"{_model_label(args)} records no dataset to evaluate it on: pass --no-eval "
                            "(or your own model's --dataset cifar10|gtsrb)")
    options = _parse_options(args.set)
    for key in ("epochs", "lr", "eta_f", "eta_r"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    options.setdefault("seed", args.seed)
    if args.method is None:  # the default measured for the model's task
        from .defenses.registry import default_method
        args.method = default_method((meta.get("dataset") or {}).get("task"))
    defense = defense_for(args.method, meta.get("dataset", {}).get("name"), **options)
    _check_task(args, defense, meta)  # before any data is read
    test_data = None
    if not args.no_eval:  # the test set is needed after purifying: find it before
        try:
            test_data = reload_test_only(meta, args.data_root)  # loaded once for before and after
        except DataError as e:
            raise DataError(f"{e}; or pass --no-eval to purify without the before/after evaluation") from None
    clean = _clean_set(args, model, meta)
    ds_meta = meta.get("dataset") or {}
    what = "images" if not ds_meta or "image_shape" in ds_meta else "items"  # no record: your own image model
    print(f"purifying {_model_label(args)} with {args.method} on {len(clean)} clean {what}", file=sys.stderr)

    def log(rec: dict[str, Any]) -> None:
        terms = "  ".join(f"{k} {rec[k]:.4f}" for k in ("ce", "trf", "noise", "anchor") if k in rec)
        acc = f"  holdout-acc {100 * rec['holdout_acc']:.2f}" if "holdout_acc" in rec else ""
        print(f"epoch {rec['epoch']:3d}  {terms}{acc}  ({rec['seconds']:.2f}s)", file=sys.stderr)

    verify = None
    if args.verify:  # the backdoor detector before purifying (clean data only; bad clean data fails there)
        from .detection.verify import PurificationCheck, format_comparison

        def verify(m, c):
            return PurificationCheck(m, c, seed=args.seed,
                                     log=None if args.quiet else (lambda t: print(f"detector: {t}", file=sys.stderr))).after
    result = purify_model(model, meta, defense, clean, test=test_data, verify=verify, progress=_progress(args),
                          callback=None if args.quiet else log)
    purified = result.model
    report = {"model": str(args.model if args.model is not None else args.weights), **result.report,
              "device": str(next(model.parameters()).device)}
    if args.verify:
        print(format_comparison(report["detector"]))
    from .defenses.describe import report_lines
    for line in report_lines(report):
        print(line)
    if test_data is not None:
        rows = [{"model": "before", **report["before"]}, {"model": "after", **report["after"]}]
        if report["der"] is not None:
            rows[1]["der"] = report["der"]
        print(format_table(rows, ["model", *metric_columns(report["before"]), "der"]))
    drop = ("arch", "arch_kwargs", "history") if getattr(purified, "fipurify_spec", None) else ("history",)
    new_meta = {k: v for k, v in meta.items() if k not in drop}
    new_meta["purification"] = {k: v for k, v in report.items() if k != "history"}
    save_model(purified, args.out, new_meta)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    print(f"saved {args.out} ({report['seconds']['total']:.1f}s)")
    return 0


def cmd_import(args) -> int:
    """Wrap a model given as architecture + weights into a fipurify model file with its metadata."""
    from .version import __version__
    from .io import save_model
    from .workflow import probe_model

    _check_model_inputs(args)
    _check_out(args, args.out)
    model, meta = _open_model(args)
    ds = meta.get("dataset")
    if ds:
        outputs = probe_model(model, tuple(ds["image_shape"]))
        if outputs != ds["num_classes"]:
            raise FipurifyError(f"the model predicts {outputs} classes, {ds['name']} has {ds['num_classes']}")
    elif meta.get("classes") is None:
        print("fipurify: warning: no --classes or --dataset: class names will come from each clean folder",
              file=sys.stderr)
    spec = model.fipurify_spec
    meta = {k: v for k, v in meta.items() if k not in ("arch", "arch_kwargs")}
    meta["fipurify_version"] = __version__
    save_model(model, args.out, meta)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved {args.out}: {spec['arch']} with {n_params:,} parameters"
          + (f", {ds['name']} ({ds['num_classes']} classes)" if ds else ""))
    return 0


def cmd_demo(args) -> int:
    """Train a small backdoored model, purify it, and evaluate before and after."""
    import time

    from . import attacks, datasets, defenses
    from .errors import DataError
    from .metrics import format_table
    from .purification import purify_model
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
    model, meta = train_backdoored(bundle, "preactresnet18", attack, cfg, width=args.width,
                                   progress=_progress(args), log=lambda m: print("      " + m, file=sys.stderr),
                                   device=_device(args))
    clean = datasets.draw_clean_subset(bundle.reserve, min(args.clean_size, len(bundle.reserve)), args.seed)
    args.method = args.method or defenses.default_method()
    print(f"[2/3] purifying with {args.method} on {len(clean)} clean images from the reserve", file=sys.stderr)
    defense = defenses.create(args.method, dataset="cifar10", seed=args.seed)
    # purify_model also evaluates (step 3), on the test set and the attack recorded in ``meta``
    result = purify_model(model, meta, defense, clean, test=bundle, progress=_progress(args))
    print("[3/3] evaluated on the test set, before and after", file=sys.stderr)
    rows = [{"model": "backdoored", **result.before},
            {"model": f"purified ({args.method})", **result.after, "der": result.der}]
    print(format_table(rows, ["model", "acc", "asr", "lcr", "der"]))
    from .defenses.describe import report_lines
    for line in report_lines(defense.report):
        print(line)
    print(f"total {time.perf_counter() - t_start:.0f}s (purification {defense.report['seconds']['total']:.0f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    p = argparse.ArgumentParser(prog="fipurify", description="Remove backdoors from trained PyTorch models.")
    p.add_argument("--version", action="version", version=f"fipurify {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks (default: one line per error)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a clean or backdoored model")
    t.add_argument("--dataset", default="cifar10",
                   help="dataset to train on: cifar10, gtsrb, synthetic; point clouds modelnet10, modelnet-off, "
                        "modelnet-h5; translation multi30k; multi-label cifar10-mosaic; video cifar10-motion "
                        "(default: %(default)s)")
    t.add_argument("--dataset-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the dataset's loader (JSON value), repeatable, recorded in the model file, "
                        "e.g. num_points=256 (modelnet10), size=2000 (cifar10-mosaic, cifar10-motion), "
                        "vocab_size=8000 (multi30k) (default: none)")
    _add_data_args(t)
    _add_device_arg(t)
    from .models import available
    t.add_argument("--arch", default="preactresnet18",
                   help=f"architecture: {', '.join(available())} (default: %(default)s)")
    t.add_argument("--arch-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the architecture (JSON value), repeatable, e.g. d_model=128 layers=2 "
                        "(transformer-mt), hidden=64 (cnn-lstm) (default: none)")
    t.add_argument("--width", type=int, default=None,
                   help="width multiplier base (preactresnet18: 64 = paper) (default: the architecture's own, "
                        "64 for preactresnet18)")
    from .attacks import available as _attacks  # the help lists what the registries hold
    from .defenses.training_time import available_training_defenses
    t.add_argument("--attack", default="badnets", metavar="ATTACK",
                   help="one of " + ", ".join(_attacks()) + ", or 'none' for a clean model (default: %(default)s)")
    t.add_argument("--target", type=int, default=0, help="target label of the backdoor (default: %(default)s)")
    t.add_argument("--poison-rate", type=float, default=None, help="share of eligible images poisoned (default: the attack's own, 0.1; SIG 0.8)")
    t.add_argument("--mode", default=None, choices=["all2one", "all2all"],
                   help="all2one or all2all; aliases such as troj-all or dyn-all set it themselves "
                        "(default: the attack's own, all2one)")
    t.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra attack option (JSON value), repeatable (default: none)")
    t.add_argument("--epochs", type=int, default=10, help="training epochs (default: %(default)s)")
    t.add_argument("--lr", type=float, default=0.1, help="peak learning rate of SGD (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=128, help="images per batch (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default: %(default)s)")
    from .training import SCHEDULES
    t.add_argument("--schedule", default="onecycle", choices=SCHEDULES,
                   help="learning-rate schedule: %(choices)s (default: %(default)s)")
    t.add_argument("--no-flip", action="store_true", help="no horizontal flips, e.g. for traffic signs (default: flip)")
    t.add_argument("--reserve", default="0.1",
                   help="clean reserve held out of training: count or fraction (default: %(default)s)")
    t.add_argument("--train-limit", type=int, default=None,
                   help="train on a seeded subset of this size (default: the whole training set)")
    t.add_argument("--eval-every", type=int, default=1, help="measure ACC/ASR every N epochs (default: %(default)s)")
    t.add_argument("--resume", action="store_true",
                   help="resumable training: write the training state to OUT.train-state.pt after every epoch and, "
                        "when that file exists, continue after its last epoch (same result as an uninterrupted "
                        "run; the file is removed once OUT is saved) (default: off)")
    t.add_argument("--defense", default="none",
                   help="train through a training-time defense: " + " or ".join(available_training_defenses())
                        + " (default none); it follows its own "
                        "paper schedule, so --epochs/--lr/--batch-size/--weight-decay/--schedule do not apply: "
                        "set its options with --defense-opt (e.g. isolation_epochs=, finetune_epochs=, "
                        "unlearn_epochs= for abl; epochs=, backdoor_epochs=, mi_weight= for cbd) "
                        "(default: %(default)s)")
    t.add_argument("--defense-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the training-time defense (JSON value), repeatable (default: none)")
    t.add_argument("--smoothness-penalty", type=float, default=0.0, metavar="ETA_F",
                   help="adaptive attack: add ETA_F * Tr(F) to the training loss (paper eq. 5; default 0 = off)")
    t.add_argument("--seed", type=int, default=0, help="random seed of data split, poisoning and training (default: %(default)s)")
    t.add_argument("--out", required=True, help="output .safetensors file (required; its folder must exist)")
    t.add_argument("--mkdir", action="store_true", help="create the output folder if missing (default: do not)")
    t.add_argument("--json", default=None, help="also write the metadata and history as JSON (default: none)")
    t.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="ACC, ASR and LCR of a saved model on its dataset and attack")
    _add_model_args(e, "model to evaluate")
    _add_data_args(e)
    e.add_argument("--json", default=None, help="write the numbers as JSON (default: none)")
    e.set_defaults(func=cmd_evaluate)

    from .defenses.registry import default_method as _default
    u = sub.add_parser("purify", help=f"remove a backdoor (default: {_default()} on image models) or run another method")
    _add_model_args(u, "backdoored model")
    from .defenses.registry import available as _methods  # the help lists what the registry holds
    u.add_argument("--method", default=None, metavar="METHOD",
                   help="one of " + ", ".join(_methods()) + "; each with its paper's defaults, changed with "
                        f"--set KEY=VALUE (the fields of its config class) (default: {_default()} for image "
                        "classification, picked by measurement; f-FIP, not shown to purify there, for the other tasks)")
    u.add_argument("--clean-size", type=int, default=None,
                   help="clean images drawn (stratified, seeded) from the model's clean reserve or from "
                        "--clean-dir (default: all of them)")
    u.add_argument("--clean-dir", default=None, metavar="FOLDER",
                   help="use your own clean images: FOLDER/<class>/*.png|jpg, one sub-folder per class; "
                        "needed for a model not trained with fipurify (default: the model's clean reserve)")
    _add_data_args(u)
    u.add_argument("--epochs", type=int, default=None,
                   help="purification epochs (default: the method's preset for the model's dataset)")
    u.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the method's preset for the model's dataset)")
    u.add_argument("--eta-f", type=float, default=None,
                   help="weight of the Fisher-trace penalty (default: the method's preset)")
    u.add_argument("--eta-r", type=float, default=None,
                   help="weight of the clean-Fisher anchor L_r (default: the method's preset)")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method's config (JSON value), repeatable (default: none)")
    u.add_argument("--seed", type=int, default=0, help="seed of the clean subset and of the method (default: %(default)s)")
    u.add_argument("--out", required=True,
                   help="output .safetensors file (required; never the input; its folder must exist)")
    u.add_argument("--mkdir", action="store_true", help="create the output folder if missing (default: do not)")
    u.add_argument("--report", default=None, help="JSON report path (default: OUT with .json)")
    u.add_argument("--verify", action="store_true",
                   help="run the neural-cleanse backdoor detector (clean data only) before and after purifying "
                        "and report both: suspected target, proxy ASR before -> after (default: off)")
    u.add_argument("--no-eval", action="store_true",
                   help="skip the before/after evaluation on the model's test set; needed when that test set "
                        "is not at hand or the model records none (default: evaluate)")
    u.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines (default: show them)")
    u.set_defaults(func=cmd_purify)

    d = sub.add_parser("demo", help="train a small backdoored model, purify it, evaluate before and after")
    d.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"],
                   help="cifar10 (falls back to synthetic when it is not found) or synthetic (default: %(default)s)")
    _add_data_args(d)
    _add_device_arg(d)
    d.add_argument("--attack", default="blend",
                   help="blend (learned within a short run), badnets, trojan, sig (default: %(default)s)")
    d.add_argument("--poison-rate", type=float, default=0.1, help="share of eligible images poisoned (default: %(default)s)")
    d.add_argument("--width", type=int, default=8, help="width of the PreActResNet18 (default: %(default)s)")
    d.add_argument("--epochs", type=int, default=6, help="training epochs (default: %(default)s)")
    d.add_argument("--train-limit", type=int, default=10000,
                   help="training images used, a seeded subset (default: %(default)s)")
    d.add_argument("--clean-size", type=int, default=500,
                   help="clean images purification uses (default: %(default)s)")
    d.add_argument("--method", default=None, help=f"purification method, as in purify (default: {_default()})")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("import", help="wrap your own model (architecture + weights) into a fipurify model file",
                       description="Wrap your own model into a fipurify model file, e.g. fipurify import --arch "
                                   "mypkg.nets:Net --arch-args '{\"num_classes\": 10}' --weights net.pt "
                                   "--dataset cifar10 --out net.safetensors")
    _add_model_args(i, None)
    i.add_argument("--out", required=True, help="output .safetensors file (required; its folder must exist)")
    i.add_argument("--mkdir", action="store_true", help="create the output folder if missing (default: do not)")
    i.set_defaults(func=cmd_import)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FipurifyError as e:
        if args.debug:  # the traceback first, then the error line on a line of its own
            import traceback
            sys.stderr.write("".join(traceback.format_exception(e)).rstrip("\n") + "\n")
        print(f"fipurify: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"fipurify: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        from . import train_state

        state = train_state.beside(args.out) if getattr(args, "resume", False) else None
        print("fipurify: interrupted; no output was written"
              + (f"; the same command continues from {state}" if state is not None and state.exists() else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
