"""Saving matplotlib figures: PNG and SVG, written atomically, no global pyplot state.

Figures are built as ``matplotlib.figure.Figure`` objects (Agg canvas) rather than through
``pyplot``, so nothing here switches the backend or leaves figures open in a caller's
session (a notebook keeps its own backend).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..io import atomic_write_bytes

FORMATS = ("png", "svg")


def new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **subplot_kw):
    """A fresh ``(Figure, axes array)`` on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def save_figure(fig, path: str | os.PathLike, formats: Sequence[str] = FORMATS, dpi: int = 120) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix in ``formats`` (``path``'s own suffix is
    replaced); returns the written paths. Each file appears whole or not at all."""
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise ConfigError(f"figure formats must be png, svg or pdf, got {list(formats)}")
    stem = Path(path)
    if stem.suffix.lower() in (".png", ".svg", ".pdf"):
        stem = stem.with_suffix("")
    out = []
    for fmt in formats:
        buf = io.BytesIO()
        # No timestamps in the files: the same figure gives the same bytes.
        meta = {"Date": None} if fmt == "svg" else ({"Software": None} if fmt == "png" else {"CreationDate": None})
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=meta)
        target = stem.with_name(stem.name + "." + fmt)
        atomic_write_bytes(target, buf.getvalue())
        out.append(target)
    return out


def fmt_rate(v: float | None) -> str:
    """A rate in [0, 1] as a percentage, '-' when unknown."""
    return "-" if v is None else f"{100 * v:.2f}%"


def fmt_num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"
