"""A picture of what a detector recovered: the trigger beside clean images with it applied."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .report import DetectionReport


def plot_trigger(report: DetectionReport, model: nn.Module, images: torch.Tensor,
                 path: str | os.PathLike, n_examples: int = 4, dpi: int = 120) -> Path:
    """Write a PNG: the candidate class's trigger (mask and pattern, the perturbation, or a cluster
    of points) and up to ``n_examples`` clean ``images`` (N x C x H x W in [0, 1], or point clouds
    N x P x 3 drawn from the side; other classes) before and after stamping it, titled with the
    model's predictions. Matplotlib's Agg canvas only (no pyplot)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io import atomic_write_bytes

    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"the figure is written as PNG: give a .png path, got {str(path)!r}")
    trig = report.trigger
    if trig is None:
        raise ConfigError("the report holds no recovered trigger to draw")
    x = images[:n_examples]
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    model_was_training = model.training
    model.eval()
    with torch.no_grad():
        stamped = trig.apply(x.to(device))
        pred_clean = model(x.to(device)).argmax(1).tolist()
        pred_trig = model(stamped).argmax(1).tolist()
    model.train(model_was_training)
    if trig.kind == "points":
        panels = [(f"trigger: {len(trig.points)} points", trig.points)]
    else:
        panels = [("trigger" if trig.kind == "mask-pattern" else "perturbation (scaled)", trig.image())]
    if trig.mask is not None:
        panels.append((f"mask (L1 {float(trig.mask.sum()):.1f})", trig.mask))
    ncols = max(len(panels), len(x))
    fig = Figure(figsize=(1.9 * ncols, 1.9 * 3 + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    show = _show_points if trig.kind == "points" else _show
    for j, (title, img) in enumerate(panels):
        show(axes[0, j], img, title)
    for j in range(len(x)):
        show(axes[1, j], x[j], f"clean: {report.class_label(pred_clean[j])}")
        show(axes[2, j], stamped[j].cpu(), f"+ trigger: {report.class_label(pred_trig[j])}")
    status = (f"suspected target {report.class_label(report.target)}" if report.backdoored
              else f"not flagged (most suspicious {report.class_label(report.candidate)})")
    fig.suptitle(f"{report.method}: {status}, score {report.score:.2f}, proxy ASR "
                 f"{100 * (report.proxy_asr or 0):.1f} %", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def _show_points(ax, cloud: torch.Tensor, title: str) -> None:
    """A point cloud (N x 3) seen from the side: x across, z (up) vertical, in the unit square."""
    a = cloud.detach().cpu().float().numpy()
    ax.scatter(a[:, 0], a[:, 2], s=1.5, c="k", linewidths=0)
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=7)


def _show(ax, img: torch.Tensor, title: str) -> None:
    a = img.detach().cpu().float()
    if a.ndim == 4:  # a clip (T x C x H x W): its first frame
        a = a[0]
    if a.shape[0] == 1:
        ax.imshow(a[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(a.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=7)
