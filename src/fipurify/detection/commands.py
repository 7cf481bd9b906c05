"""``fipurify detect``: is a saved model backdoored, and toward which class? (clean data only)"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def register(subparsers) -> None:
    """Add ``detect`` to the ``fipurify`` command line."""
    from ..command_args import _add_data_args, _add_model_args
    from .registry import DEFAULT_METHOD, available

    d = subparsers.add_parser("detect", help="detect a backdoor and its target class from clean data alone")
    _add_model_args(d, "model to examine")
    d.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"detector: {', '.join(available())} (default {DEFAULT_METHOD}; uap is cheaper)")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--clean-dir", default=None,
                     help="use your own clean images: a folder of class/*.png (default: the model's clean reserve)")
    src.add_argument("--clean-size", type=int, default=None,
                     help="clean images drawn from the model's clean reserve, stratified (default: the whole reserve)")
    _add_data_args(d)
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the detector's config, e.g. max_steps=50 (JSON value), repeatable "
                        "(default: none, the detector's defaults)")
    d.add_argument("--json", default=None, metavar="OUT",
                   help="write the report as JSON, and the recovered triggers beside it as "
                        "OUT-stem.triggers.safetensors (default: not written)")
    d.add_argument("--figure", default=None, metavar="OUT.png",
                   help="draw the recovered trigger beside clean images with it applied (default: no figure)")
    d.add_argument("--fail-if-backdoored", action="store_true",
                   help="exit with status 1 when the model is flagged (default: exit 0 whatever the verdict)")
    d.add_argument("--seed", type=int, default=0, help="seed of the clean subset, split and batches (default 0)")
    d.add_argument("--quiet", action="store_true", help="no per-class progress lines on stderr (default: shown)")
    d.set_defaults(func=cmd_detect)


def cmd_detect(args) -> int:
    from ..command_args import _check_model_inputs, _clean_set, _model_label, _open_model, _parse_options
    from ..errors import ConfigError
    from ..io import atomic_write_text
    from ..validation import check_output_path
    from .registry import create

    _check_model_inputs(args)
    if args.figure and Path(args.figure).suffix.lower() != ".png":
        raise ConfigError(f"--figure writes a PNG: give a .png path, got {args.figure!r}")
    for flag, out in (("--json", args.json), ("--figure", args.figure)):
        if out:  # before any compute: not a directory, not the model, in an existing folder
            check_output_path(out, [args.model, args.weights], False, flag)
    options = _parse_options(args.set)
    options.setdefault("seed", args.seed)
    detector = create(args.method, **options)  # bad names and options fail before any data loads
    model, meta = _open_model(args)
    clean = _clean_set(args, model, meta)
    log = None if args.quiet else (lambda m: print("  " + m, file=sys.stderr))
    if not args.quiet:
        print(f"detecting with {detector.name} on {len(clean)} clean images of {_model_label(args)}",
              file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed below as one line each
        report = detector.detect(model, clean, log=log)
    for w in report.warnings:
        print(f"fipurify: warning: {w}", file=sys.stderr)
    print(report.verdict())
    print(report.table())
    print(f"({report.seconds:.1f}s; {report.n_optimise} clean images to optimise, {report.n_holdout} held out)")
    if args.json:
        doc = {"model": _model_label(args), **report.to_dict()}
        triggers = Path(args.json).with_suffix(".triggers.safetensors")
        report.save_triggers(triggers)
        doc["triggers_file"] = triggers.name
        truth = (meta.get("attack") or {})
        if truth:  # for the reader only: the detector never saw it
            doc["recorded_attack"] = {"name": truth.get("name"), "target": truth.get("target"),
                                      "mode": truth.get("mode"), "asr": (meta.get("metrics") or {}).get("asr")}
        atomic_write_text(args.json, json.dumps(doc, indent=2))
    if args.figure:
        from .figure import plot_trigger

        data = detector.split(model, clean)
        plot_trigger(report, model, data.x_hold[data.y_hold != report.candidate], args.figure)
    return 1 if args.fail_if_backdoored and report.backdoored else 0
