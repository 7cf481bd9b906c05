"""What a purification did, in a few printable lines, from its report (used by the CLI).

Each method that has something to say beyond the common fields contributes one formatter:
the detector's rounds (:func:`~fipurify.defenses.trigger_unlearn.format_rounds`), the activation
bounds (:func:`~fipurify.defenses.act_clip.format_bounds`), the steps a sequence left out.
"""
from __future__ import annotations

from typing import Any

from .act_clip import format_bounds
from .trigger_unlearn import format_rounds


def report_lines(report: dict[str, Any]) -> list[str]:
    """The lines the formatters make of ``report`` (a defense's ``report`` dict), in pipeline order."""
    lines = [format_rounds(report), format_bounds(report)]
    lines += [f"step {name} left out: {why}" for name, why in (report.get("skipped_steps") or {}).items()]
    return [line for line in lines if line]
