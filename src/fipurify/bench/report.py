"""Paper-style tables from the results store: aggregation over seeds, best-per-column, paper numbers.

:func:`build_table` turns a spec and its stored results into rows (one per grid cell
without the seed) holding mean, standard deviation and count of each metric, the best
defense per column within each group marked, and the paper's own numbers where the
spec has them. :mod:`fipurify.bench.render` writes them as Markdown, HTML, CSV and JSON.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

from .spec import METRICS, Spec
from .store import ResultStore

#: Metrics shown as percentages (stored as fractions).
RATES = ("acc", "asr", "lcr", "der", "val", "acc_retuned", "asr_retuned")
#: Column titles.
TITLES = {"acc": "ACC", "asr": "ASR", "lcr": "LCR", "der": "DER", "val": "Val", "time": "Time (s)",
          "epoch_time": "s/epoch", "peak_mb": "Peak MB", "acc_retuned": "ACC after retune",
          "asr_retuned": "ASR after retune"}
#: Columns read from ``details["retune"]``: column -> key there.
RETUNED = {"acc_retuned": "acc", "asr_retuned": "asr"}
DIM_TITLES = {"attack": "Attack", "defense": "Defense", "clean_size": "Clean size"}
DEFAULT_COLUMNS = ["acc", "asr", "lcr", "der", "time"]


def metric_value(row: dict[str, Any], metric: str) -> float | None:
    """The value of ``metric`` in a stored result row (None where it does not apply)."""
    if metric == "val":
        return row.get("val_acc")
    if metric in RETUNED:  # the retuning attack's figures ([retune] specs), kept in the row's details
        details = row.get("details")
        retune = details.get("retune") if isinstance(details, dict) else None
        return retune.get(RETUNED[metric]) if isinstance(retune, dict) else None
    if metric in RATES:
        return row.get(metric)
    if metric == "time":
        return row.get("purify_seconds")
    if metric == "epoch_time":
        return row.get("purify_epoch_seconds")
    if metric == "peak_mb":
        return row.get("gpu_peak_mb") if row.get("gpu_peak_mb") is not None else row.get("purify_peak_mb")
    raise KeyError(metric)


@dataclass
class Cell:
    """Mean, sample standard deviation (None for one value) and count of one metric over seeds."""
    mean: float | None
    std: float | None
    n: int

    @staticmethod
    def of(values: list[float | None]) -> "Cell":
        vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not vals:
            return Cell(None, None, 0)
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        return Cell(mean, std, len(vals))


@dataclass
class TableRow:
    """One grid cell (all seeds): its dimension ids, metric cells, best flags and paper numbers."""
    dims: dict[str, str]
    cells: dict[str, Cell]
    n_ok: int
    n_expected: int
    best: set[str] = field(default_factory=set)
    paper: dict[str, float] = field(default_factory=dict)
    #: when the row's figures come from an earlier report (``carry``), that report's generation time
    carried_from: str | None = None


@dataclass
class Table:
    """A spec's results ready to render."""
    spec: Spec
    dims: list[str]
    columns: list[str]
    rows: list[TableRow]
    failed: list[dict[str, Any]]
    missing: list[str]
    environment: dict[str, list[str]]
    n_runs: int
    n_ok: int
    compute: dict[str, Any] = field(default_factory=dict)  # seconds and counts behind the finished runs
    #: runs not in the store whose row was carried from an earlier report, and that report's facts
    n_carried: int = 0
    carried: dict[str, Any] = field(default_factory=dict)

    def paper_columns(self) -> list[str]:
        """Metrics among the columns for which the spec has at least one paper number."""
        return [c for c in self.columns if any(c in r.paper for r in self.rows)]

    def label(self, dim: str, value: str) -> str:
        """Display label of a dimension value (spec labels for attacks and defenses)."""
        return self.spec.entry_labels().get(dim, {}).get(value, value)


def _same(a: Any, b: Any) -> bool:
    """Paper-row key equality: numbers by value (0.25 == "0.25"), text case-insensitively."""
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


def _paper_numbers(spec: Spec, dims: dict[str, str]) -> dict[str, float]:
    """The paper's numbers for one row: every paper row whose keys all match, the most specific last."""
    rows = spec.paper_table.get("rows", [])
    matching = []
    for p in rows:
        keys = {k: v for k, v in p.items() if k not in METRICS and k != "note"}
        if keys and all(k in dims and _same(dims[k], v) for k, v in keys.items()):
            matching.append((len(keys), p))
    out: dict[str, float] = {}
    for _, p in sorted(matching, key=lambda t: t[0]):
        out.update({k: float(v) for k, v in p.items() if k in METRICS and v is not None})
    return out


def _mark_best(rows: list[TableRow], dims: list[str], columns: list[str]) -> None:
    """Flag the best defense per column within each group (rows equal in every dimension but defense).

    "none" (no defense) never counts; a group needs two candidates that do not all tie.
    Ties for the best are all marked.
    """
    groups: dict[tuple, list[TableRow]] = {}
    for r in rows:
        groups.setdefault(tuple(r.dims[d] for d in dims if d != "defense"), []).append(r)
    for members in groups.values():
        for col in columns:
            cands = [r for r in members if r.dims.get("defense") != "none" and r.cells[col].mean is not None]
            if len(cands) < 2:
                continue
            pick = max if METRICS[col] else min
            best = pick(r.cells[col].mean for r in cands)
            if all(math.isclose(r.cells[col].mean, best, rel_tol=1e-9, abs_tol=1e-12) for r in cands):
                continue  # nothing stands out
            for r in cands:
                if math.isclose(r.cells[col].mean, best, rel_tol=1e-9, abs_tol=1e-12):
                    r.best.add(col)


def read_report(path: str | Path) -> dict[str, Any]:
    """An earlier JSON report (written by :func:`~fipurify.bench.render.to_json`), for ``--carry``;
    ConfigError (one line) for a file that is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--carry {path}: not a readable JSON report ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), str) or not isinstance(doc.get("rows"), list) \
            or "generated_at" not in doc:
        raise ConfigError(f"--carry {path}: not a JSON report written by `fipurify report` (no spec / rows / "
                          "generated_at)")
    return doc


def load_carry(path: str | Path, spec: Spec) -> dict[str, Any]:
    """An earlier JSON report of ``spec`` whose rows may fill the cells this store has no run for
    (:func:`read_report`, and ConfigError if it reports another spec)."""
    doc = read_report(path)
    if doc["spec"] != spec.name:
        raise ConfigError(f"--carry {path}: it reports spec {doc['spec']!r}, not {spec.name!r}")
    return doc


def _carried_row(doc: dict[str, Any], dims: dict[str, str]) -> dict[str, Any] | None:
    """The earlier report's row for these dimension values, if it had a finished run."""
    for r in doc["rows"]:
        if all(str(r.get(d)) == str(v) for d, v in dims.items()) and int(r.get("n") or 0) > 0:
            return r
    return None


def build_table(spec: Spec, store: ResultStore, carry: dict[str, Any] | None = None) -> Table:
    """Aggregate the stored results of ``spec``'s grid (looked up by run key) into a table.

    ``carry`` (an earlier JSON report of the same spec, :func:`load_carry`) fills each row none of
    whose runs is in the store (not run here; a failed run is a result and is shown) with that report's
    figures, marked as carried: a store lost with its machine need not cost the rows it held.
    """
    runs = spec.runs()
    dims = spec.dims()
    columns = list(spec.table.get("columns", DEFAULT_COLUMNS))
    by_key = {r["run_key"]: r for r in store.rows([r.key for r in runs])}
    groups: dict[tuple, list] = {}
    for run in runs:
        groups.setdefault(tuple(run.dims[d] for d in dims), []).append(run)
    rows, failed, missing = [], [], []
    env: dict[str, set[str]] = {k: set() for k in ("fipurify_version", "code_hash", "torch_version", "python_version",
                                                    "device", "host")}
    n_ok = n_carried = 0
    train_s: dict[str, float] = {}  # base model key -> its training seconds (counted once per model)
    purify_s = 0.0
    for key, members in groups.items():
        ok = []
        for run in members:
            res = by_key.get(run.key)
            if res is None:
                missing.append(run.label)
            elif res["status"] != "ok":
                failed.append({"label": run.label, "run_key": run.key, "error": res.get("error")})
            else:
                ok.append(res)
                if isinstance(res.get("train_seconds"), (int, float)):
                    train_s[run.base_model_key] = (float(res["train_seconds"]), res.get("train_device") or "unknown")
                if isinstance(res.get("purify_seconds"), (int, float)):
                    purify_s += float(res["purify_seconds"])
                for k in env:
                    if res.get(k):
                        env[k].add(str(res[k]))
        n_ok += len(ok)
        cells = {m: Cell.of([metric_value(r, m) for r in ok]) for m in METRICS}
        d = dict(zip(dims, key))
        old = _carried_row(carry, d) if carry is not None and all(by_key.get(r.key) is None for r in members) else None
        if old is not None:
            n = int(old["n"])
            cells = {m: Cell(old.get(f"{m}_mean"), old.get(f"{m}_std"), n if old.get(f"{m}_mean") is not None else 0)
                     for m in METRICS}
            labels = {r.label for r in members}
            missing = [m for m in missing if m not in labels]
            n_carried += len(members)
            rows.append(TableRow(d, cells, n, len(members), paper=_paper_numbers(spec, d),
                                 carried_from=old.get("carried_from") or carry["generated_at"]))
            continue
        rows.append(TableRow(d, cells, len(ok), len(members), paper=_paper_numbers(spec, d)))
    _mark_best(rows, dims, list(METRICS))
    by_device: dict[str, list[float]] = {}  # device -> [seconds, models]
    for secs, dev in train_s.values():
        acc = by_device.setdefault(dev, [0.0, 0])
        acc[0] += secs
        acc[1] += 1
    compute = {"train_seconds": sum(v[0] for v in by_device.values()), "n_models": len(train_s),
               "purify_seconds": purify_s, "train_by_device": by_device}
    carried = {}
    if n_carried:
        carried = {"generated_at": sorted({r.carried_from for r in rows if r.carried_from}),
                   "code_hash": list((carry.get("environment") or {}).get("code_hash") or [])}
    return Table(spec, dims, columns, rows, failed, missing, {k: sorted(v) for k, v in env.items()},
                 len(runs), n_ok, compute, n_carried, carried)


def format_cell(metric: str, cell: Cell) -> str:
    """``mean ± std`` in the metric's unit (percent for rates); "-" when there is no value."""
    if cell.mean is None:
        return "-"
    scale, digits = (100.0, 2) if metric in RATES else (1.0, 0 if metric == "peak_mb" else 1)
    text = f"{cell.mean * scale:.{digits}f}"
    if cell.std is not None:
        text += f" ± {cell.std * scale:.{digits}f}"
    return text


def format_paper(metric: str, value: float | None) -> str:
    """A paper number as printed in the paper (rates already in percent)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if metric in RATES else f"{value:.1f}"
