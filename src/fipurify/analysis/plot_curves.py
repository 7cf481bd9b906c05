"""Training / purification curves from tracked records (paper Figures 1c-d and 3)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from ..errors import ConfigError
from .figures import FORMATS, new_figure, save_figure

Records = Sequence[Mapping[str, Any]]
LABELS = {"lambda_max": r"$\lambda_{max}$", "trace_h": "Tr(H)", "trace_f": "Tr(F)", "acc": "ACC (%)",
          "asr": "ASR (%)", "holdout_acc": "holdout ACC (%)", "loss": "loss", "ce": "CE"}
RATES = ("acc", "asr", "holdout_acc", "lcr", "train_acc")


def _series(records: Union[Records, Mapping[str, Records]]) -> dict[str, Records]:
    if isinstance(records, Mapping):
        return dict(records)
    return {"": records}


def _points(recs: Records, key: str, x: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in recs:
        v = r.get(key)
        if v is None or r.get(x) is None or (isinstance(v, float) and math.isnan(v)):
            continue
        xs.append(float(r[x]))
        ys.append(100 * float(v) if key in RATES else float(v))
    return xs, ys


def plot_curves(records: Union[Records, Mapping[str, Records]], path: str | os.PathLike,
                sharpness: Sequence[str] = ("lambda_max", "trace_f"), metrics: Sequence[str] = ("acc", "asr"),
                x: str = "epoch", log_sharpness: bool = True, title: str | None = None,
                formats: Sequence[str] = FORMATS, dpi: int = 120) -> list[Path]:
    """One panel per sharpness measure and one for ACC/ASR, against ``x`` (epochs).

    ``records`` is one list of per-epoch dicts (e.g. ``SmoothnessTracker.records``) or a
    mapping ``name -> list`` to overlay several runs (e.g. one per attack, Fig. 1c).
    Keys missing from every record are skipped; ACC/ASR are fractions, shown in percent.
    """
    series = _series(records)
    if not series or not any(series.values()):
        raise ConfigError("nothing to plot: no records")
    present = lambda k: any(_points(r, k, x)[0] for r in series.values())  # noqa: E731
    sharp = [k for k in sharpness if present(k)]
    mets = [k for k in metrics if present(k)]
    n_panels = len(sharp) + (1 if mets else 0)
    if n_panels == 0:
        raise ConfigError(f"the records hold none of {', '.join(list(sharpness) + list(metrics))}")
    fig, axes = new_figure(4.2 * n_panels, 3.3, ncols=n_panels)
    axes = list(axes[0])
    for ax, key in zip(axes, sharp):
        for name, recs in series.items():
            xs, ys = _points(recs, key, x)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=name or None)
        if log_sharpness and all(y > 0 for r in series.values() for y in _points(r, key, x)[1]):
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(LABELS.get(key, key))
        if len(series) > 1:
            ax.legend(fontsize=8)
    if mets:
        ax = axes[-1]
        styles = {"acc": "-", "asr": "--"}
        for i, (name, recs) in enumerate(series.items()):
            color = f"C{i}"
            for key in mets:
                xs, ys = _points(recs, key, x)
                if xs:
                    lab = f"{name} {key.upper()}".strip() if name else key.upper()
                    ax.plot(xs, ys, styles.get(key, ":"), marker="o", ms=3, color=color if name else None,
                            label=lab)
        ax.set_ylim(-2, 102)
        ax.set_xlabel(x)
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, formats, dpi)
