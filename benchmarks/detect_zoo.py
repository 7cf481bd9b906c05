"""Backdoor detection table over a zoo of saved models: detected?, target correct?, score, proxy ASR, time.

    python benchmarks/detect_zoo.py [FOLDER ...] [--methods neural-cleanse uap] [--clean-size 500]
        [--clean-size-for DATASET=N ...] [--seed 0] [--set KEY=VALUE ...] [--data-root R] [--limit N]
        [--out results/detect_zoo]
        [--resume] [--ft-baseline | --ft-specs SPEC ...] [--purified-specs SPEC ...]
        [--store results/bench/results.sqlite]
        [--figure OUT.png]

FOLDER defaults to fipurify bench's model cache (``$FIPURIFY_CACHE/bench-models``, else
``~/.cache/fipurify/bench-models``); every ``*.safetensors`` in it is one model. Each
detector sees ``--clean-size`` images (seed ``--seed``, stratified) of the model's clean
reserve only: never the test set or the attack. The truth (attack, target, ASR) comes
from the model file's metadata (``attack``, ``metrics``) and is used only to score the
rows: for a backdoored all-to-one model "detected" means flagged and "target ok" means the
suspected target is the attack's; for a clean model (no attack), "detected" is a false
positive; all-to-all models have no single target. A backdoor is *strong* when the
model's test ASR is at least 90 %. Writes OUT.json (rows + summary) and OUT.md.

- ``--resume`` keeps the rows of an existing OUT.json and runs only the (model, method)
  pairs it lacks, so new models (another clean seed) can be added to the table.
- ``--ft-baseline`` also times vanilla fine-tuning (``ft``, the dataset's paper schedule)
  on the same clean images, for the time ratio detector / FT per model; ``--ft-specs`` takes
  FT's time from the ``ft`` runs of those bench specs instead (same model, 500 clean images).
- ``--purified-specs`` reads the results store's ``[verify]`` runs of those specs
  (purified models whose true test ASR is known): the trigger recovered before purifying,
  replayed on the purified model, gives a proxy ASR from clean data; the summary gives its
  Spearman rank correlation with the true ASR.
- ``--figure`` draws each method's scores, clean against backdoored models, with the threshold.

The AUROC of ``score`` separates the backdoored models (every attack, weak ones included,
and by itself the strong ones) from the clean models; ``inf`` scores rank highest.
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


def label(name: str, attack: str = "none", mode: str | None = None) -> str:
    """A short name for tables and the figure: ``dataset:id`` from a bench cache file name
    (``cifar10_troj-all_preactresnet18-w16_e10_s0_<hash>.safetensors``, the seed appended to a
    clean model's), else the attack's name (``-all`` for all-to-all)."""
    parts = name.split("_")
    if len(parts) >= 4 and name.endswith(".safetensors"):
        seed = next((p for p in parts if p[:1] == "s" and p[1:].isdigit()), None)
        return f"{parts[0]}:{parts[1]}" + (f" {seed}" if parts[1] == "clean" and seed else "")
    return f"{attack}-all" if mode == "all2all" else attack


STRONG = 0.9  # a backdoor is strong at test ASR >= 90 % (the goal of issue 18)


def is_strong(attack: str, true_asr: float | None) -> bool:
    """A backdoored model (``attack`` not "none") whose test ASR is at least :data:`STRONG`."""
    return bool(attack != "none" and (true_asr or 0) >= STRONG)


def run_model(path: Path, methods: list[str], clean_size: int, seed: int, options: dict[str, Any],
              data_root: str | None, ft_baseline: bool = False) -> list[dict[str, Any]]:
    """One row per detector for the model file ``path`` (and, with ``ft_baseline``, FT's seconds)."""
    import warnings

    from fipurify import detect, load_model
    from fipurify.purification import defense_for
    from fipurify.workflow import reserve_sample

    model, meta = load_model(path)
    clean = reserve_sample(meta, clean_size, seed, data_root)
    t = truth(meta)
    t["label"] = label(path.name, t["attack"], t["mode"])
    ft_seconds = None
    if ft_baseline:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            defense_for("ft", (meta.get("dataset") or {}).get("name")).purify(model, clean, progress=False)
        ft_seconds = time.perf_counter() - t0
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = detect(model, clean, method=method, seed=seed, **options)
        backdoored_truth = t["attack"] != "none"
        rows.append({"model": path.name, **t, "method": method, "n_clean": len(clean),
                     "strong": is_strong(t["attack"], t["true_asr"]),
                     "flagged": rep.backdoored, "suspected_target": rep.target, "candidate": rep.candidate,
                     "detected": rep.backdoored if backdoored_truth else None,
                     "false_positive": None if backdoored_truth else rep.backdoored,
                     "target_correct": (rep.target == t["true_target"]) if t["true_target"] is not None else None,
                     "score": rep.to_dict()["score"], "threshold": rep.threshold, "proxy_asr": rep.proxy_asr,
                     "seconds": time.perf_counter() - t0, "ft_seconds": ft_seconds, "warnings": rep.warnings})
    return rows


def _score(r: dict[str, Any]) -> float:
    """The row's score as a float (the JSON report writes an infinite score as the string "inf")."""
    return float(r["score"])


def auroc(positive: list[float], negative: list[float]) -> float | None:
    """Area under the ROC curve of a score separating ``positive`` from ``negative``:
    P(score_pos > score_neg) + P(equal) / 2 over all pairs (the Mann-Whitney form; ties count half)."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks; None if undefined."""
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def purified_rows(store_path: str, specs: list[str]) -> list[dict[str, Any]]:
    """``[verify]`` runs of ``specs`` in the results store: the replayed proxy ASR after purifying
    (the trigger recovered before, on the purified model, clean images) beside the true test ASR."""
    from fipurify.bench.store import ResultStore

    out = []
    with ResultStore(store_path) as store:
        for spec in specs:
            for r in store.rows(spec=spec):
                v = (r.get("details") or {}).get("verify")
                if r["status"] != "ok" or not v or r.get("asr") is None:
                    continue
                out.append({"spec": spec, "attack": r["attack"], "defense": r["defense"], "true_asr": r["asr"],
                            "asr_before": r["asr_before"], "flagged_before": v.get("flagged_before"),
                            "flagged_after": v.get("flagged_after"), "proxy_asr_before": v.get("proxy_asr_before"),
                            "proxy_asr_after": v.get("proxy_asr_after"), "kind": v.get("proxy_asr_after_kind")})
    return out


def stored_ft_seconds(store_path: str, specs: list[str]) -> dict[str, float]:
    """Vanilla FT's own wall time (``purify_seconds``) per model file name, from the ``ft`` runs of
    ``specs`` in the results store (the mean where a model has several)."""
    from fipurify.bench.store import ResultStore

    times: dict[str, list[float]] = {}
    with ResultStore(store_path) as store:
        for spec in specs:
            for r in store.rows(spec=spec):
                model_file = (r.get("details") or {}).get("model_file")
                if r["status"] == "ok" and r["defense"] == "ft" and model_file and r.get("purify_seconds"):
                    times.setdefault(Path(model_file).name, []).append(r["purify_seconds"])
    return {k: sum(v) / len(v) for k, v in times.items()}


def summary(rows: list[dict[str, Any]], purified: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ft = {r["model"]: r["ft_seconds"] for r in rows if r.get("ft_seconds")}  # FT timed once per model
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        bd = [r for r in mine if r["detected"] is not None]
        strong = [r for r in bd if r.get("strong")]
        clean = [r for r in mine if r["false_positive"] is not None]
        tgt = [r for r in mine if r["target_correct"] is not None and r["flagged"]]  # of the flagged ones
        strong_tgt = [r for r in strong if r["target_correct"] is not None]
        ratios = [r["seconds"] / ft[r["model"]] for r in mine if ft.get(r["model"])]
        out[method] = {"n_models": len(mine), "n_backdoored": len(bd), "n_strong": len(strong), "n_clean": len(clean),
                       "detection_rate": sum(r["detected"] for r in bd) / len(bd) if bd else None,
                       "strong_detection_rate": sum(r["detected"] for r in strong) / len(strong) if strong else None,
                       "target_accuracy": sum(r["target_correct"] for r in tgt) / len(tgt) if tgt else None,
                       "strong_flagged_at_target": (sum(bool(r["detected"] and r["target_correct"]) for r in strong_tgt)
                                                    / len(strong_tgt) if strong_tgt else None),
                       "false_positive_rate": sum(r["false_positive"] for r in clean) / len(clean) if clean else None,
                       "auroc": auroc([_score(r) for r in bd], [_score(r) for r in clean]),
                       "auroc_strong": auroc([_score(r) for r in strong], [_score(r) for r in clean]),
                       "mean_seconds": sum(r["seconds"] for r in mine) / len(mine) if mine else None,
                       "max_time_vs_ft": max(ratios) if ratios else None,
                       "mean_time_vs_ft": sum(ratios) / len(ratios) if ratios else None}
    if purified:
        usable = [p for p in purified if p["proxy_asr_after"] is not None and p["kind"] == "replayed"]
        out["purified"] = {"n": len(usable),
                           "spearman_replayed_proxy_vs_asr": spearman([p["proxy_asr_after"] for p in usable],
                                                                      [p["true_asr"] for p in usable])}
    return out


def markdown(rows: list[dict[str, Any]], summ: dict[str, Any], purified: list[dict[str, Any]] | None = None) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def yn(v):
        return "-" if v is None else ("yes" if v else "no")

    def num(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| model | attack | true target | true ASR % | method | flagged | suspected | target ok | score | "
             "proxy ASR % | seconds | FT seconds |", "|" + "---|" * 12]
    for r in rows:
        score = r["score"] if isinstance(r["score"], str) else f"{r['score']:.2f}"
        lines.append(f"| {r.get('label', r['model'])} | {r['attack']} | {r['true_target'] if r['true_target'] is not None else '-'} | "
                     f"{pct(r['true_asr'])} | {r['method']} | {yn(r['flagged'])} | "
                     f"{r['suspected_target'] if r['suspected_target'] is not None else '-'} | {yn(r['target_correct'])} | "
                     f"{score} | {pct(r['proxy_asr'])} | {r['seconds']:.1f} | {num(r.get('ft_seconds'), '{:.1f}')} |")
    lines += ["", "| method | models (backdoored / strong / clean) | detection rate % (strong) | strong flagged at target % "
              "| target accuracy of the flagged % | false-positive rate % | AUROC (strong) | mean seconds | time / FT (max) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m, s in summ.items():
        if m == "purified":
            continue
        lines.append(f"| {m} | {s['n_backdoored']} / {s['n_strong']} / {s['n_clean']} | {pct(s['detection_rate'])} "
                     f"({pct(s['strong_detection_rate'])}) | {pct(s['strong_flagged_at_target'])} | "
                     f"{pct(s['target_accuracy'])} | {pct(s['false_positive_rate'])} | {num(s['auroc'])} "
                     f"({num(s['auroc_strong'])}) | {s['mean_seconds']:.1f} | {num(s['mean_time_vs_ft'])} "
                     f"({num(s['max_time_vs_ft'])}) |")
    if purified:
        lines += ["", "| spec | attack | defense | flagged before / after | replayed proxy ASR % | true ASR % after |",
                  "|---|---|---|---|---|---|"]
        for p in purified:
            lines.append(f"| {p['spec']} | {p['attack']} | {p['defense']} | {yn(p['flagged_before'])} / "
                         f"{yn(p['flagged_after'])} | {pct(p['proxy_asr_after'])} ({p['kind'] or '-'}) | "
                         f"{pct(p['true_asr'])} |")
        ps = summ["purified"]
        lines += ["", f"Spearman rank correlation, replayed proxy ASR against true ASR over {ps['n']} purified "
                      f"models: {num(ps['spearman_replayed_proxy_vs_asr'])}"]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per method: each model's score (log scale), clean models against backdoored ones
    (strong all-to-one, all-to-all, weak), the flagging thresholds as lines (one per class count); an infinite score is
    drawn at the top edge."""
    import io
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fipurify.io import atomic_write_bytes

    methods = sorted({r["method"] for r in rows})
    groups = [("clean", lambda r: r["attack"] == "none"),
              ("strong, all-to-one", lambda r: r["attack"] != "none" and r["strong"] and r["true_target"] is not None),
              ("all-to-all", lambda r: r["attack"] != "none" and r["true_target"] is None),
              ("other backdoored\n(ASR < 90 %)", lambda r: r["attack"] != "none" and not r["strong"]
               and r["true_target"] is not None)]
    fig = Figure(figsize=(4.2 * len(methods), 3.6))
    FigureCanvasAgg(fig)
    for k, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), k + 1)
        mine = [r for r in rows if r["method"] == method]
        finite = [_score(r) for r in mine if math.isfinite(_score(r)) and _score(r) > 0]
        thresholds = sorted({float(r["threshold"]) for r in mine})
        top = max(finite + thresholds) * 2 if finite else 10.0
        for g, (label, keep) in enumerate(groups):
            sel = [r for r in mine if keep(r)]
            ys = [min(_score(r), top) if _score(r) > 0 else 0.05 for r in sel]
            xs = [g + 0.08 * ((i % 5) - 2) for i in range(len(sel))]
            colors = ["tab:red" if r["flagged"] else "tab:blue" for r in sel]
            ax.scatter(xs, ys, c=colors, s=28, edgecolors="black", linewidths=0.4, zorder=3)
            for x, y, r in zip(xs, ys, sel):
                if r["attack"] != "none":
                    text = r.get("label", r["attack"]).split(":")[-1]
                    if r["flagged"] and r["target_correct"] is False:
                        text += f" (flags class {r['suspected_target']})"
                    ax.annotate(text, (x, y), fontsize=6, xytext=(4, 0), textcoords="offset points",
                                va="center")
        for t, ls in zip(thresholds, ("--", ":", "-.", "-")):  # it rises with the class count (GTSRB: 43)
            ax.axhline(t, color="gray", ls=ls, lw=1, label=f"threshold {t:.2f}")
        if len(thresholds) > 1:
            ax.legend(fontsize=6, loc="upper right")
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[0] for g in groups], fontsize=7)
        ax.set_xlim(-0.5, len(groups) - 0.3)
        ax.set_ylabel("score (larger = more suspicious)")
        ax.set_title(f"{method}: red = flagged", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    from fipurify.cli import parse_key_values
    from fipurify.errors import ConfigError, DataError
    from fipurify.io import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", help="folders of fipurify model files (default: the bench model cache)")
    p.add_argument("--methods", nargs="+", default=["neural-cleanse", "uap"], help="detectors (default both)")
    p.add_argument("--clean-size", type=int, default=500, help="clean reserve images per model (default 500)")
    p.add_argument("--clean-size-for", action="append", default=[], metavar="DATASET=N",
                   help="clean images for one dataset's models, repeatable (e.g. gtsrb=1176: its rare classes "
                        "need more images for the detectors' 5 per class)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clean subset and detectors (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="detector option for every method (JSON value), repeatable (default: none)")
    p.add_argument("--data-root", default=None, help="dataset root (default: $FIPURIFY_DATA, then ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="only the first N models (default: all)")
    p.add_argument("--out", default="results/detect_zoo", help="output stem for .json and .md (default results/detect_zoo)")
    p.add_argument("--resume", action="store_true", help="keep OUT.json's rows; run only the missing (model, method) pairs")
    p.add_argument("--ft-baseline", action="store_true", help="also time vanilla FT on the same clean images")
    p.add_argument("--purified-specs", nargs="*", default=[], metavar="SPEC",
                   help="bench specs whose [verify] runs give purified models with a known true ASR")
    p.add_argument("--ft-specs", nargs="*", default=[], metavar="SPEC",
                   help="take FT's time per model from these specs' ft runs in the store (instead of --ft-baseline)")
    p.add_argument("--store", default="results/bench/results.sqlite",
                   help="results store for --purified-specs and --ft-specs")
    p.add_argument("--figure", default=None, metavar="OUT.png", help="score distribution figure (PNG)")
    args = p.parse_args(argv)
    if args.figure and Path(args.figure).suffix.lower() != ".png":
        print(f"--figure is written as PNG: give a .png path, got {args.figure!r}", file=sys.stderr)
        return 2
    if (args.purified_specs or args.ft_specs) and not Path(args.store).is_file():
        print(f"--purified-specs and --ft-specs need the results store, and {args.store} does not exist",
              file=sys.stderr)
        return 2
    folders = [Path(f).expanduser() for f in args.folders] or [default_folder()]
    files = sorted(f for folder in folders for f in folder.glob("*.safetensors"))[:args.limit]
    if not files:
        print(f"no *.safetensors model files in {', '.join(map(str, folders))}", file=sys.stderr)
        return 2
    options = {k.replace("-", "_"): v for k, v in parse_key_values(args.set).items()}
    sizes = parse_key_values(args.clean_size_for)
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        print(f"--clean-size-for needs DATASET=N with N a positive integer, got {bad}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.resume and out.with_suffix(".json").is_file():
        rows = json.loads(out.with_suffix(".json").read_text())["rows"]
        for r in rows:  # rows written before labels existed
            r.setdefault("label", label(r["model"], r["attack"], r.get("mode")))
            r.setdefault("strong", is_strong(r["attack"], r.get("true_asr")))
    purified = purified_rows(args.store, args.purified_specs) if args.purified_specs else None
    stored_ft = stored_ft_seconds(args.store, args.ft_specs) if args.ft_specs else {}

    def with_stored_ft() -> None:
        for r in rows:
            if not r.get("ft_seconds") and r["model"] in stored_ft:
                r["ft_seconds"], r["ft_source"] = stored_ft[r["model"]], "store"

    def write() -> str:
        """OUT.json and OUT.md from the rows so far; returns the markdown."""
        with_stored_ft()
        summ = summary(rows, purified)
        doc = {"config": {"methods": args.methods, "clean_size": args.clean_size, "seed": args.seed,
                          "options": options, "folders": [str(f) for f in folders]},
               "rows": rows, "summary": summ, "purified": purified}
        text = markdown(rows, summ, purified)
        atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=2))
        atomic_write_text(out.with_suffix(".md"), text)
        return text

    for f in files:
        todo = [m for m in args.methods if not any(r["model"] == f.name and r["method"] == m for r in rows)]
        if not todo:
            continue
        print(f"{f.name}", file=sys.stderr)
        size = next((n for d, n in sizes.items() if f.name.startswith(f"{d}_")), args.clean_size)
        try:
            new_rows = run_model(f, todo, size, args.seed, options, args.data_root, args.ft_baseline)
        except (ConfigError, DataError) as e:  # one unusable model does not end the zoo; --resume retries it
            print(f"  skipped: {e}", file=sys.stderr)
            continue
        for r in new_rows:
            rows.append(r)
            print(f"  {r['method']}: flagged {r['flagged']}, suspected {r['suspected_target']} "
                  f"(true {r['true_target']}), score {r['score']}, proxy ASR {r['proxy_asr']}, "
                  f"{r['seconds']:.1f}s (FT {r['ft_seconds']})", file=sys.stderr)
        write()  # after every model: a stopped run keeps what it measured (--resume goes on from it)
    text = write()
    if args.figure:
        figure(rows, Path(args.figure))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
