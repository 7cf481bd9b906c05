"""``fipurify analyze`` and ``fipurify scan``: smoothness numbers and pictures for saved models."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

EVIDENCE_NOTE = ("Evidence, not a verdict: a backdoored model tends to sit in a sharper minimum (larger "
              "lambda_max, Tr(H); paper Observation 1), but learning rate, epochs, augmentation, width and "
              "data also change sharpness. Compare only models of the same architecture trained alike on "
              "the same data, and confirm with other evidence.")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $FIPURIFY_DATA, then ../shared/data)")
    p.add_argument("--n", type=int, default=200, help="images the Hessian is measured on (default: %(default)s)")
    p.add_argument("--split", default="train", choices=["train", "reserve", "test"],
                   help="where the images come from: the clean training part with true labels (default, "
                        "as in the paper), the clean reserve, or the test set (the only one for your own "
                        "model given as --arch/--weights --dataset NAME)")
    p.add_argument("--params", default="all", choices=["all", "spectral"],
                   help="curvature w.r.t. all weights (default) or f-FIP's singular-value shifts")
    p.add_argument("--lanczos-steps", type=int, default=20, help="Lanczos steps for lambda_max (default: %(default)s)")
    p.add_argument("--probes", type=int, default=20, help="Hutchinson probes for Tr(H) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image sample and the probes (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")


def register(subparsers) -> None:
    """Add ``analyze`` and ``scan`` to the ``fipurify`` command line."""
    from ..command_args import _add_model_args

    a = subparsers.add_parser("analyze", help="loss-surface smoothness of a model: numbers and figures")
    _add_model_args(a, "model to analyse")
    _add_common(a)
    a.add_argument("--compare", default=None, metavar="OTHER_MODEL",
                   help="a second fipurify model file (e.g. purified or clean) analysed on the same images "
                        "(default: none)")
    a.add_argument("--out", default=None, help="output folder (default: MODEL's name + '-analysis')")
    a.add_argument("--slq-runs", type=int, default=2, help="probes of the eigenvalue density (default: %(default)s)")
    a.add_argument("--slq-steps", type=int, default=30, help="Lanczos steps per density probe (default: %(default)s)")
    a.add_argument("--eval-limit", type=int, default=None,
                   help="measure ACC/ASR on this many test images (default: all)")
    a.add_argument("--no-eval", action="store_true", help="skip ACC/ASR (default: measure them)")
    a.add_argument("--no-tsne", action="store_true", help="skip the t-SNE picture (default: draw it)")
    a.set_defaults(func=cmd_analyze)

    s = subparsers.add_parser("scan", help="sharpness of a model (and of a clean reference) as evidence of a backdoor")
    _add_model_args(s, "model to scan")
    s.add_argument("--reference", default=None, metavar="CLEAN_MODEL",
                   help="a fipurify model file known to be clean, same architecture and data (default: none)")
    _add_common(s)
    s.add_argument("--json", default=None, help="also write the numbers as JSON (default: none)")
    s.set_defaults(func=cmd_scan)


# --------------------------------------------------------------------------- shared steps
def _log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _check_args(args) -> None:
    from ..errors import ConfigError

    for key in ("n", "lanczos_steps", "probes", "slq_runs", "slq_steps", "eval_limit"):
        v = getattr(args, key, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {v}")


def _load_pair(args, other_path: str | None):
    from ..command_args import _check_model_inputs, _model_label, _open_model
    from ..errors import DataError
    from ..io import load_model

    _check_model_inputs(args)
    model, meta = _open_model(args)
    label = _model_label(args)
    if not meta.get("dataset"):
        raise DataError(f"{label} records no dataset to analyse it on: give --arch/--weights with --dataset "
                        "cifar10|gtsrb and --split test (or fipurify import it with --dataset)")
    if not meta.get("clean_reserve") and args.split != "test":
        raise DataError(f"{label} was not trained with fipurify, so its training split is unknown: use --split test")
    other = None
    if other_path:
        om, ometa = load_model(other_path)
        mine, theirs = meta.get("dataset") or {}, ometa.get("dataset") or {}
        for key in ("image_shape", "num_classes"):
            if theirs.get(key) is not None and mine.get(key) is not None and theirs[key] != mine[key]:
                raise DataError(f"{Path(other_path).name} was made for {key} {theirs[key]}, "
                                f"{label} for {mine[key]}: they cannot be compared on the same data")
        other = (om, ometa)
    return (model, meta), other


def _measure(args, model, sample, measures) -> Any:
    from .measures import smoothness_report

    return smoothness_report(model, sample, measures=measures, params=args.params,
                             lanczos_steps=args.lanczos_steps, probes=args.probes,
                             slq_runs=getattr(args, "slq_runs", 2), slq_steps=getattr(args, "slq_steps", 30),
                             seed=args.seed, progress=not args.quiet)


def _eval_meta(meta: dict, fallback: dict) -> dict:
    """Evaluate a model against its own attack, else against the analysed model's (e.g. a clean model's ASR)."""
    if meta.get("attack") or not fallback.get("attack"):
        return meta
    return {**meta, "attack": fallback["attack"]}


# --------------------------------------------------------------------------- analyze
def cmd_analyze(args) -> int:
    from ..io import atomic_write_text
    from ..workflow import evaluate_saved
    from .plot_density import DensityPanel, plot_densities
    from .sample import draw_sample, limit_test, load_bundle

    _check_args(args)
    t_start = time.perf_counter()
    (model, meta), other = _load_pair(args, args.compare)
    from ..command_args import _model_label

    label = Path(_model_label(args)).stem
    out = Path(args.out) if args.out else Path(f"{label}-analysis")
    bundle = load_bundle(meta, args.data_root, args.split)
    sample = draw_sample(bundle, args.split, args.n, args.seed)
    entries = [(label, args.model or args.weights, model, meta)]
    if other is not None:
        entries.append((Path(args.compare).stem, args.compare, other[0], other[1]))
    test_bundle = limit_test(bundle, args.eval_limit, args.seed)
    results, panels = [], []
    for name, path, m, mt in entries:
        _log(args, f"analysing {name} on {len(sample[0])} {args.split} images ({args.params} parameters)")
        rep = _measure(args, m, sample, ("lambda_max", "trace", "density", "fisher"))
        metrics = None
        if not args.no_eval and meta.get("dataset"):
            _log(args, f"evaluating {name} on {len(test_bundle.test)} test images")
            metrics = {k: v for k, v in evaluate_saved(m, _eval_meta(mt, meta), bundle=test_bundle).items()
                       if k in ("acc", "asr", "lcr", "n_clean", "n_backdoor")}
        results.append({"name": name, "path": str(path), "metrics": metrics, "smoothness": rep.to_dict()})
        panels.append(DensityPanel(name, rep.density, rep.lambda_max, rep.trace.value,
                                   metrics["acc"] if metrics else None, metrics["asr"] if metrics else None))
        _log(args, _summary_line(name, rep, metrics))
    figures = [str(p) for p in plot_densities(panels, out / "density")]
    attack = _attack(meta)
    if attack is not None:
        from .plot_examples import plot_trigger_examples

        figures += [str(p) for p in plot_trigger_examples(attack, bundle.test, out / "trigger_examples",
                                                          seed=args.seed)]
    if not args.no_tsne:
        from .plot_tsne import plot_tsne

        _log(args, "t-SNE of penultimate features")
        poisoned = attack.backdoor_test_set(bundle.test) if attack is not None else None
        figures += [str(p) for p in plot_tsne({n: m for n, _, m, _ in entries}, bundle.test, poisoned,
                                              out / "tsne", n_clean=500, n_poisoned=100, seed=args.seed)]
    doc = {"model": str(args.model or args.weights), "compare": args.compare,
           "data": {"dataset": (meta.get("dataset") or {}).get("name"), "split": args.split,
                    "n": int(len(sample[0])), "seed": args.seed},
           "settings": {k: getattr(args, k) for k in ("params", "lanczos_steps", "probes", "slq_runs", "slq_steps",
                                                     "eval_limit")},
           "models": results, "figures": figures, "seconds": time.perf_counter() - t_start}
    atomic_write_text(out / "analysis.json", json.dumps(doc, indent=2))
    print(_table(results))
    print(f"wrote {out / 'analysis.json'} and {len(figures)} figure files ({doc['seconds']:.0f}s)")
    return 0


def _attack(meta: dict):
    from .. import attacks

    spec = meta.get("attack")
    return attacks.from_spec(spec) if spec else None


def _summary_line(name: str, rep, metrics: dict | None) -> str:
    parts = [f"{name}: lambda_max {rep.lambda_max:.4g}"]
    if rep.trace is not None:
        parts.append(f"Tr(H) {rep.trace.value:.4g} +- {rep.trace.stderr:.2g}")
    if rep.fisher is not None:
        parts.append(f"Tr(F) {rep.fisher.value:.4g}")
    if metrics:
        parts.append(f"ACC {100 * metrics['acc']:.2f}%")
        if metrics.get("asr") is not None:
            parts.append(f"ASR {100 * metrics['asr']:.2f}%")
    return "  ".join(parts)


def _table(results: list[dict]) -> str:
    from ..metrics import format_table

    rows = []
    for r in results:
        s = r["smoothness"]
        row = {"model": r["name"], "lambda_max": s["lambda_max"],
               "tr_h": s["trace_h"]["value"] if s["trace_h"] else None,
               "tr_h_se": s["trace_h"]["stderr"] if s["trace_h"] else None,
               "tr_f": s["trace_f"]["value"] if s["trace_f"] else None}
        if r.get("metrics"):
            row.update(acc=r["metrics"]["acc"], asr=r["metrics"]["asr"])
        rows.append(row)
    return format_table(rows, ["model", "lambda_max", "tr_h", "tr_h_se", "tr_f", "acc", "asr"])


# --------------------------------------------------------------------------- scan
def cmd_scan(args) -> int:
    from ..io import atomic_write_text
    from .sample import draw_sample, load_bundle

    _check_args(args)
    (model, meta), ref = _load_pair(args, args.reference)
    bundle = load_bundle(meta, args.data_root, args.split)
    sample = draw_sample(bundle, args.split, args.n, args.seed)
    measures = ("lambda_max", "trace", "fisher")
    reports = {"model": _measure(args, model, sample, measures)}
    if ref is not None:
        reports["reference"] = _measure(args, ref[0], sample, measures)
    numbers: dict[str, Any] = {}
    for key, rep in reports.items():
        numbers[key] = {"lambda_max": rep.lambda_max, "trace_h": rep.trace.value, "trace_h_se": rep.trace.stderr,
                        "trace_f": rep.fisher.value, "loss": rep.loss}
    ratios = None
    if ref is not None:
        m, r = numbers["model"], numbers["reference"]
        ratios = {k: (m[k] / r[k] if r[k] else None) for k in ("lambda_max", "trace_h", "trace_f")}
    lines = [f"sharpness on {len(sample[0])} {args.split} images ({args.params} parameters, seed {args.seed}):"]
    for key, v in numbers.items():
        name = Path(args.model or args.weights if key == "model" else args.reference).name
        lines.append(f"  {key:9s} {name}: lambda_max {v['lambda_max']:.4g}   Tr(H) {v['trace_h']:.4g} "
                     f"+- {v['trace_h_se']:.2g}   Tr(F) {v['trace_f']:.4g}")
    if ratios is not None:
        lines.append("  model / reference: " + "   ".join(
            f"{k} x{v:.3g}" if v is not None else f"{k} -" for k, v in ratios.items()))
        sharper = [k for k, v in ratios.items() if v is not None and v > 1]
        lines.append(f"  the model is sharper than the reference on {len(sharper)} of 3 measures"
                     + (f" ({', '.join(sharper)})" if sharper else ""))
    else:
        lines.append("  (no --reference: these numbers have no universal threshold; compare with a clean model "
                     "of the same architecture trained the same way)")
    lines.append(EVIDENCE_NOTE)
    print("\n".join(lines))
    if args.json:
        doc = {"model": args.model or args.weights, "reference": args.reference, "split": args.split, "n": int(len(sample[0])),
               "params": args.params, "seed": args.seed, "numbers": numbers, "ratios": ratios, "note": EVIDENCE_NOTE}
        atomic_write_text(args.json, json.dumps(doc, indent=2))
    return 0
