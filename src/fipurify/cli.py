"""The ``fipurify`` command line: train, evaluate, purify, demo.

Every error caused by input (files, data, options) ends the command with one readable
line on stderr and exit status 2; outputs are written atomically or not at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import FipurifyError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $FIPURIFY_DATA, then ../shared/data)")


def _parse_attack_kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise FipurifyError(f"--attack-opt takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def cmd_train(args) -> int:
    from . import attacks
    from .io import atomic_write_text, save_model
    from .training import TrainConfig
    from .workflow import load_data, train_backdoored

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
                      weight_decay=args.weight_decay, seed=args.seed, flip=not args.no_flip,
                      eval_every=args.eval_every).validate()
    bundle = load_data(args.dataset, args.data_root, _reserve(args.reserve), args.seed, args.train_limit)
    attack = None
    if args.attack != "none":
        attack = attacks.create(args.attack, target=args.target, poison_rate=args.poison_rate,
                                mode=args.mode, seed=args.seed, **_parse_attack_kv(args.attack_opt))
    print(f"training {args.arch} on {bundle.dataset_info['name']}: {len(bundle.train)} training images, "
          f"{len(bundle.reserve)} held out as clean reserve, attack: {args.attack}", file=sys.stderr)
    model, meta = train_backdoored(bundle, args.arch, attack, cfg, width=args.width,
                                   progress=_progress(args), log=lambda m: print(m, file=sys.stderr))
    save_model(model, args.out, meta)
    m = meta["metrics"]
    print(f"saved {args.out}: ACC {100 * m['acc']:.2f}%" + (f", ASR {100 * m['asr']:.2f}%" if m["asr"] is not None else ""))
    if args.json:
        atomic_write_text(args.json, json.dumps(meta, indent=2))
    return 0


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
    t.add_argument("--mode", default="all2one", choices=["all2one", "all2all"])
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
