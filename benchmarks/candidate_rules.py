"""Issue 19's choice rules for a default-purifier candidate, from the bench results store.

    python benchmarks/candidate_rules.py DEFENSE_ID SPEC [SPEC ...] [--db results/bench/results.sqlite]

For every finished run of ``DEFENSE_ID`` in the SPECs (e.g. ``du-clip default-clip default-clip-verify``),
one row: Val before -> after (the selection figure: 1,000 clean reserve images disjoint from the defense's
500), the detector's verdict before / after and the replayed proxy ASR where the spec has a ``[verify]``
section, the mean relative activation bound where the method clips (rule 7), and the test ACC / ASR before
and after (recorded; they choose nothing). Then the rules of docs/default-purifier-devlog.md:

- rule 5: Val drop <= 4 points on each model and <= 2 on their mean;
- rule 2: wherever the detector flagged a trigger before, the replayed proxy ASR after is <= 5 %;
- rule 6: wherever it flagged one before, it flags nothing after.

Prints a Markdown table and the verdicts; reads the store only.
"""
from __future__ import annotations

import argparse
import json
import sqlite3


def rows(db: str, defense: str, specs: list[str]) -> list[dict]:
    con = sqlite3.connect(db)
    out = []
    marks = ",".join("?" * len(specs))
    query = (f"select spec, attack, acc, asr, acc_before, asr_before, val_acc, details from results "
             f"where defense = ? and status = 'ok' and spec in ({marks}) order by spec, attack")
    for spec, attack, acc, asr, acc0, asr0, val, details in con.execute(query, [defense, *specs]):
        d = json.loads(details or "{}")
        v = d.get("verify") or {}
        rep = d.get("defense_report") or {}
        rel = rep.get("relative_bounds") or {}
        out.append({"spec": spec, "attack": attack, "val_before": d.get("val_before"), "val_after": val,
                    "acc_before": acc0, "asr_before": asr0, "acc": acc, "asr": asr,
                    "flagged_before": v.get("flagged_before"), "flagged_after": v.get("flagged_after"),
                    "score_after": v.get("score_after"), "replayed": v.get("proxy_asr_after") if v else None,
                    "mean_bound": sum(rel.values()) / len(rel) if rel else None,
                    "first_half_bound": _first_half(rel)})
    return out


def _first_half(rel: dict) -> float | None:
    """Mean relative bound over the first half of the bounded modules' forward order as reported (the
    modules 4g and 4h both bound when 4h bounds all: rule 7 compares over those)."""
    if not rel:
        return None
    half = list(rel.values())[: max(1, len(rel) // 2)]
    return sum(half) / len(half)


def pct(v, digits=2):
    return "-" if v is None else f"{100 * v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("defense")
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--db", default="results/bench/results.sqlite")
    args = ap.parse_args()
    rs = rows(args.db, args.defense, args.specs)
    if not rs:
        raise SystemExit(f"no finished run of {args.defense!r} in {', '.join(args.specs)}")
    print("| model | Val before -> after (change) | detector before / after | replayed proxy ASR | mean bound "
          "| test ACC / ASR before | after (record) |")
    print("|---|---|---|---|---|---|---|")
    drops = []
    for r in rs:
        drop = 100 * (r["val_before"] - r["val_after"])
        drops.append(drop)
        det = "-" if r["flagged_before"] is None else \
            f"{'flagged' if r['flagged_before'] else 'not flagged'} / " \
            f"{'flagged' if r['flagged_after'] else 'not flagged'} ({r['score_after']:.2f})"
        bound = "-" if r["mean_bound"] is None else f"{r['mean_bound']:.2f}"
        print(f"| {r['attack']} | {pct(r['val_before'], 1)} -> {pct(r['val_after'], 1)} ({-drop:+.1f}) | {det} "
              f"| {pct(r['replayed'], 1)} | {bound} | {pct(r['acc_before'])} / {pct(r['asr_before'])} "
              f"| {pct(r['acc'])} / {pct(r['asr'])} |")
    mean = sum(drops) / len(drops)
    flagged = [r for r in rs if r["flagged_before"]]
    rule5 = max(drops) <= 4 and mean <= 2
    rule2 = all(r["replayed"] is not None and r["replayed"] <= 0.05 for r in flagged)
    rule6 = all(not r["flagged_after"] for r in flagged)
    bounds = [r["first_half_bound"] for r in rs if r["first_half_bound"] is not None]
    print()
    print(f"{len(rs)} models; Val drop: largest {max(drops):.1f}, mean {mean:.2f} -> rule 5 "
          f"{'passes' if rule5 else 'fails'}")
    print(f"flagged before on {len(flagged)}: rule 2 (replayed <= 5 %) {'passes' if rule2 else 'fails'}, "
          f"rule 6 (not flagged after) {'passes' if rule6 else 'fails'}")
    if bounds:
        print(f"mean relative bound over the first half of the bounded modules (rule 7): "
              f"{sum(bounds) / len(bounds):.3f}")


if __name__ == "__main__":
    main()
