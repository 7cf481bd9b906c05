"""Eigenvalue-density pictures in the style of the paper's Figure 1a-b."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from .density import SpectralDensity
from .figures import FORMATS, fmt_num, fmt_rate, new_figure, save_figure


@dataclass
class DensityPanel:
    """One panel: a density and the numbers printed in its corner (``None`` = not shown)."""
    title: str
    density: SpectralDensity
    lambda_max: float | None = None
    trace: float | None = None
    acc: float | None = None
    asr: float | None = None


def _corner_text(p: DensityPanel) -> str:
    lines = []
    if p.lambda_max is not None:
        lines.append(rf"$\lambda_{{max}}$ = {fmt_num(p.lambda_max)}")
    if p.trace is not None:
        lines.append(f"Tr(H) = {fmt_num(p.trace)}")
    if p.acc is not None:
        lines.append(f"ACC = {fmt_rate(p.acc)}")
    if p.asr is not None:
        lines.append(f"ASR = {fmt_rate(p.asr)}")
    return "\n".join(lines)


def draw_density(ax, p: DensityPanel, floor: float = 1e-6) -> None:
    """One log-scale density on ``ax`` with the panel's numbers in the upper-right corner."""
    d = p.density
    # Normalise to a peak of 1 so panels of different spectral range compare; floor for log.
    y = np.maximum(d.density / max(float(d.density.max()), 1e-300), floor)
    ax.semilogy(d.grid, y, color="tab:blue", lw=1.2)
    ax.fill_between(d.grid, floor, y, color="tab:blue", alpha=0.25)
    ax.set_ylim(floor, 2.0)
    if p.lambda_max is not None:  # the density's probes need not reach the top eigenvalue: mark it
        ax.axvline(p.lambda_max, color="tab:red", ls="--", lw=0.9)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale, peak = 1)")
    ax.set_title(p.title, fontsize=10)
    text = _corner_text(p)
    if text:
        ax.text(0.97, 0.96, text, transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})


def plot_densities(panels: Sequence[DensityPanel], path: str | os.PathLike, formats: Sequence[str] = FORMATS,
                   sharex: bool = False, dpi: int = 120) -> list[Path]:
    """Side-by-side densities (e.g. backdoored vs purified, or benign vs backdoored); writes PNG + SVG.

    ``sharex=False`` (default) gives each panel its own eigenvalue range: the wider range
    of a sharper model is the point of the comparison (paper Fig. 1a-b).
    """
    if not panels:
        raise ConfigError("nothing to plot: give at least one density panel")
    fig, axes = new_figure(4.2 * len(panels), 3.4, ncols=len(panels), sharex=sharex)
    for ax, p in zip(axes[0], panels):
        draw_density(ax, p)
    return save_figure(fig, path, formats, dpi)
