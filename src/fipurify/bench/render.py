"""Writing a :class:`~fipurify.bench.report.Table` as Markdown, one self-contained HTML page, CSV and JSON.

Long layout: one line per grid cell (dimensions, then each metric and the paper's number
beside it). With ``[table] pivot = "attack"`` one dimension becomes column groups, as in
the paper's tables. The best defense per column is bold. Every file is written atomically.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes, atomic_write_text
from .report import DIM_TITLES, RATES, TITLES, Table, TableRow, format_cell, format_paper
from .spec import METRICS
from .store import utc_now


# --------------------------------------------------------------------------- layout
def _layout(t: Table) -> tuple[list[str], list[tuple[str, str, str]], list[tuple[TableRow | None, list[TableRow | None]]]]:
    """(row dims, column specs (group, metric, kind), body lines).

    A column spec is ``(group value or "", metric, "ours"|"paper")``; a body line is
    ``(row giving the dimension labels, the row behind each column group)``.
    """
    pivot = t.spec.table.get("pivot")
    paper_cols = set(t.paper_columns())
    sub = []
    for m in t.columns:
        sub.append((m, "ours"))
        if m in paper_cols:
            sub.append((m, "paper"))
    if not pivot:
        return t.dims, [("", m, k) for m, k in sub], [(r, [r]) for r in t.rows]
    row_dims = [d for d in t.dims if d != pivot]
    groups: list[str] = []
    lines: dict[tuple, dict[str, TableRow]] = {}
    for r in t.rows:
        if r.dims[pivot] not in groups:
            groups.append(r.dims[pivot])
        lines.setdefault(tuple(r.dims[d] for d in row_dims), {})[r.dims[pivot]] = r
    cols = [(g, m, k) for g in groups for m, k in sub]
    body = []
    for cells in lines.values():
        first = next(iter(cells.values()))
        body.append((first, [cells.get(g) for g in groups]))
    return row_dims, cols, body


def _cell(t: Table, row: TableRow | None, metric: str, kind: str) -> tuple[str, bool]:
    if row is None:
        return "", False
    if kind == "paper":
        return format_paper(metric, row.paper.get(metric)), False
    return format_cell(metric, row.cells[metric]), metric in row.best


def _header(t: Table, col: tuple[str, str, str]) -> str:
    g, m, k = col
    name = TITLES[m].replace(" (s)", "") + " (paper)" if k == "paper" else TITLES[m]
    return f"{t.label(t.spec.table.get('pivot', ''), g)} {name}" if g else name


def _rows_text(t: Table) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    row_dims, cols, body = _layout(t)
    header = [DIM_TITLES.get(d, d) for d in row_dims] + [_header(t, c) for c in cols] + ["n"]
    lines = []
    pivot = t.spec.table.get("pivot")
    for first, per_group in body:
        cells = [(t.label(d, first.dims[d]), False) for d in row_dims]
        groups = sorted({c[0] for c in cols}, key=[c[0] for c in cols].index)
        for c in cols:
            row = per_group[groups.index(c[0])] if pivot else per_group[0]
            cells.append(_cell(t, row, c[1], c[2]))
        present = [r for r in per_group if r is not None]
        cells.append((_n_text(present) + (CARRIED_MARK if any(r.carried_from for r in present) else ""), False))
        lines.append(cells)
    return header, lines


#: marks the ``n`` of a row whose figures were carried from an earlier report
CARRIED_MARK = "†"


def _n_text(rows: list[TableRow]) -> str:
    """Finished seeds per cell: "3", or "2/3" when some are missing, or "1-3/3" across column groups."""
    lo, hi = min(r.n_ok for r in rows), max(r.n_ok for r in rows)
    exp = max(r.n_expected for r in rows)
    got = str(lo) if lo == hi else f"{lo}-{hi}"
    return got if lo == hi == exp else f"{got}/{exp}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 600 else f"{seconds:.0f} s"


def units_note(columns: list[str]) -> str:
    """What the shown columns measure, e.g. "; ACC and ASR in %; time = purification seconds (...)"."""
    pct = [TITLES[m] for m in columns if m in RATES]
    parts = []
    if pct:
        parts.append((", ".join(pct[:-1]) + " and " + pct[-1] if len(pct) > 1 else pct[0]) + " in %")
    if "val" in columns:
        parts.append("Val = accuracy on 1,000 clean reserve images disjoint from the defense's clean set "
                     "(the selection figure: clean data only)")
    if "asr_retuned" in columns or "acc_retuned" in columns:
        parts.append("after retune = after the retuning attack (fipurify.retune: a short fine-tune of the purified "
                     "model on its clean images plus a few poisoned ones; the spec's [retune] settings)")
    if "time" in columns:
        parts.append("time = purification seconds (training seconds for training-time defenses)")
    if "epoch_time" in columns:
        parts.append("s/epoch = seconds per purification epoch")
    if "peak_mb" in columns:
        parts.append("peak MB = growth of peak resident memory during purification (on a GPU: peak allocated GPU memory)")
    return "".join("; " + p for p in parts)


def _notes(t: Table) -> list[str]:
    spec = t.spec
    notes = [f"Spec `{spec.name}`: {t.n_ok} of {t.n_runs} runs finished"
             + (f", {t.n_carried} carried from an earlier report" if t.n_carried else "")
             + (f", {len(t.failed)} failed" if t.failed else "") + (f", {len(t.missing)} not run yet" if t.missing else "")
             + f". Generated {utc_now()}."]
    if t.n_carried:
        when = ", ".join(t.carried.get("generated_at", []))
        code = ", ".join(t.carried.get("code_hash", []))
        notes.append(f"{CARRIED_MARK} Carried, not rerun: {t.n_carried} run(s) whose results store was lost with its "
                     f"machine; their figures are those of the report generated {when}"
                     + (f" (code {code})" if code else "") + ", and the compute below does not count them.")
    notes.append("Mean ± sample standard deviation over seeds (n = finished seeds)" + units_note(t.columns)
                 + ". Bold: best defense in the column within its group (no defense excluded).")
    c = t.compute
    if c.get("n_models") or c.get("purify_seconds"):
        by_dev = c.get("train_by_device") or {}
        where = ""
        if len(by_dev) > 1 or any(d != "cpu" for d in by_dev):  # say where the training ran
            where = " (" + ", ".join(f"{_hours(v[0])} for {int(v[1])} on {d}" for d, v in sorted(by_dev.items())) + ")"
        notes.append(f"Compute behind the finished runs: {_hours(c.get('train_seconds', 0.0))} training "
                     f"{c.get('n_models', 0)} backdoored model(s){where} and {_hours(c.get('purify_seconds', 0.0))} "
                     "of defense time (sums of task times, not wall-clock).")
    if spec.paper_table.get("rows"):
        notes.append(f"Paper numbers: {spec.paper_table.get('source', 'the paper')}.")
    env = {k: v for k, v in t.environment.items() if v and k != "host"}
    if env:
        notes.append("Environment: " + "; ".join(f"{k.replace('_', ' ')} {', '.join(v)}" for k, v in env.items())
                     + (f"; hosts {', '.join(t.environment['host'])}" if t.environment.get("host") else "") + ".")
    return notes


# --------------------------------------------------------------------------- markdown
def to_markdown(t: Table) -> str:
    """The table and its notes as Markdown (best values in bold)."""
    header, lines = _rows_text(t)
    out = [f"# {t.spec.title}", ""]
    if t.spec.description:
        out += [t.spec.description.strip(), ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in lines:
        out.append("| " + " | ".join(f"**{v}**" if b and v not in ("", "-") else v for v, b in cells) + " |")
    out.append("")
    out += [n + "\n" for n in _notes(t)]
    if t.failed:
        out += ["## Failed runs", ""] + [f"- `{f['label']}`: {f['error']}" for f in t.failed] + [""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em}
h1{font-size:1.4em} table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th{background:#f2f2f2} td.dim{text-align:left} td.paper,th.paper{color:#666;font-style:italic;background:#fafafa}
td.best{font-weight:bold;background:#e8f4e8} p.note{color:#555;font-size:.9em} li{font-size:.9em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
""".strip()


def to_html(t: Table, figures: dict[str, bytes] | None = None) -> str:
    """One self-contained HTML page: inline CSS, the table, notes, failures and PNG figures as base64."""
    esc = html.escape
    row_dims, cols, body = _layout(t)
    pivot = t.spec.table.get("pivot")
    head = []
    if pivot:
        groups = []
        for c in cols:
            if c[0] not in groups:
                groups.append(c[0])
        per = len(cols) // max(len(groups), 1)
        head.append("<tr>" + "".join(f'<th rowspan="2">{esc(DIM_TITLES.get(d, d))}</th>' for d in row_dims)
                    + "".join(f'<th colspan="{per}">{esc(t.label(pivot, g))}</th>' for g in groups)
                    + '<th rowspan="2">n</th></tr>')
        head.append("<tr>" + "".join(f'<th class="{c[2]}">{esc(_header(t, ("",) + c[1:]))}</th>'
                                     for c in cols) + "</tr>")
    else:
        head.append("<tr>" + "".join(f"<th>{esc(DIM_TITLES.get(d, d))}</th>" for d in row_dims)
                    + "".join(f'<th class="{k}">{esc(_header(t, c))}</th>' for c in cols for k in [c[2]])
                    + "<th>n</th></tr>")
    _, text_lines = _rows_text(t)
    trs = []
    for (first, _), cells in zip(body, text_lines):
        tds = []
        for i, (v, best) in enumerate(cells):
            if i < len(row_dims):
                cls = "dim"
            elif i - len(row_dims) < len(cols):
                kind = cols[i - len(row_dims)][2]
                cls = "paper" if kind == "paper" else ("best" if best and v not in ("", "-") else "")
            else:
                cls = ""
            tds.append(f'<td class="{cls}">{esc(v)}</td>' if cls else f"<td>{esc(v)}</td>")
        trs.append("<tr>" + "".join(tds) + "</tr>")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(t.spec.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(t.spec.title)}</h1>"]
    if t.spec.description:
        parts.append(f"<p>{esc(t.spec.description.strip())}</p>")
    parts.append("<table><thead>" + "".join(head) + "</thead><tbody>" + "".join(trs) + "</tbody></table>")
    parts += [f'<p class="note">{esc(n)}</p>' for n in _notes(t)]
    for name, png in (figures or {}).items():
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{esc(name)}</figcaption></figure>")
    if t.failed:
        parts.append("<h2>Failed runs</h2><ul>" + "".join(
            f"<li><code>{esc(f['label'])}</code>: {esc(str(f['error']))}</li>" for f in t.failed) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- csv / json
def _flat_rows(t: Table) -> list[dict[str, Any]]:
    out = []
    for r in t.rows:
        d: dict[str, Any] = {"spec": t.spec.name, **r.dims, "n": r.n_ok, "n_expected": r.n_expected,
                             "carried_from": r.carried_from}
        for m in METRICS:
            c = r.cells[m]
            d[f"{m}_mean"], d[f"{m}_std"] = c.mean, c.std
            d[f"{m}_best"] = m in r.best
            d[f"{m}_paper"] = r.paper.get(m)
        out.append(d)
    return out


def to_csv(t: Table) -> str:
    """One line per grid cell: dimensions, then mean, std, best flag and paper number of every metric.

    Rates are fractions here (paper numbers stay in the paper's percent).
    """
    rows = _flat_rows(t)
    buf = io.StringIO()
    fields = ["spec", *t.dims, "n", "n_expected", "carried_from"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "best", "paper")]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def to_json(t: Table) -> str:
    """The table as JSON: spec facts, rows (as in the CSV), failed and missing runs."""
    doc = {"spec": t.spec.name, "title": t.spec.title, "generated_at": utc_now(), "dims": t.dims,
           "columns": t.columns, "rates_are_fractions": True, "paper_source": t.spec.paper_table.get("source"),
           "n_runs": t.n_runs, "n_ok": t.n_ok, "environment": t.environment, "rows": _flat_rows(t),
           "failed": t.failed, "missing": t.missing, "n_carried": t.n_carried, "carried": t.carried}
    return json.dumps(doc, indent=2) + "\n"


# --------------------------------------------------------------------------- figures
def runtime_figure(t: Table) -> bytes | None:
    """A bar chart of mean purification time per defense (paper's Figure 4 style), as PNG; None without data."""
    per: dict[str, list[float]] = {}
    paper: dict[str, list[float]] = {}
    for r in t.rows:
        d = r.dims.get("defense")
        if d == "none":
            continue
        if r.cells["time"].mean is not None:
            per.setdefault(d, []).append(r.cells["time"].mean)
        if "time" in r.paper:
            paper.setdefault(d, []).append(r.paper["time"])
    if not per:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(per)
    panels = [("ours", names, [sum(per[n]) / len(per[n]) for n in names], "#4C72B0")]
    pnames = [n for n in names if n in paper] + [n for n in paper if n not in per]
    if pnames:  # the paper's seconds come from other hardware: its own panel and axis
        panels.append(("paper", pnames, [sum(paper[n]) / len(paper[n]) for n in pnames], "#999999"))
    width = max(4.0, 0.8 * sum(len(p[1]) for p in panels) + 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.2), dpi=110, squeeze=False,
                             gridspec_kw={"width_ratios": [max(len(p[1]), 1) for p in panels]})
    for ax, (title, labels, values, color) in zip(axes[0], panels):
        ax.bar(range(len(labels)), values, width=0.6, color=color)
        ax.set_xticks(range(len(labels)), [t.label("defense", n) for n in labels], rotation=30, ha="right")
        ax.set_title(title, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].set_ylabel("purification time (s)")
    fig.suptitle(f"{t.spec.title}: mean runtime per defense", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- files
FORMATS = ("md", "html", "csv", "json")


def write_report(t: Table, out_dir: str | Path, figures_dir: str | Path | None = None,
                 extra_figures: bool = False, formats: tuple[str, ...] = FORMATS,
                 make_figures: bool = True) -> list[Path]:
    """Write ``<out>/<spec>.{md,html,csv,json}`` (atomically) and the runtime figure; returns the paths.

    The runtime chart goes to ``figures_dir`` (default ``<out>/figures``) as
    ``<spec>-runtime.png``; the HTML page embeds it, and with ``extra_figures`` every
    other PNG in ``figures_dir`` as well.
    """
    out = Path(out_dir)
    fig_dir = Path(figures_dir) if figures_dir is not None else out / "figures"
    paths: list[Path] = []
    figures: dict[str, bytes] = {}
    if make_figures:
        png = runtime_figure(t)
        if png is not None:
            p = atomic_write_bytes(fig_dir / f"{t.spec.name}-runtime.png", png)
            paths.append(p)
            figures[p.name] = png
    if extra_figures and fig_dir.is_dir():
        for p in sorted(fig_dir.glob("*.png")):
            if p.name not in figures:
                figures[p.name] = p.read_bytes()
    writers = {"md": to_markdown, "html": lambda tt: to_html(tt, figures), "csv": to_csv, "json": to_json}
    for fmt in formats:
        paths.append(atomic_write_text(out / f"{t.spec.name}.{fmt}", writers[fmt](t)))
    return paths
