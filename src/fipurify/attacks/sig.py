"""SIG (Barni et al. 2019): a clean-label attack with a sinusoidal signal."""
from __future__ import annotations

from .base import ATTACKS, Attack
from .triggers import SinusoidalTrigger


class SIG(Attack):
    """Clean-label sinusoidal-signal attack.

    Only training images of the target class carry the signal and their labels are left
    unchanged; ``poison_rate`` is the share of the target-class images poisoned (default
    0.8, as in the paper's experiments). The backdoor test set applies the signal to the
    test images of every other class. Signal: vertical stripes
    ``delta * sin(2*pi*j*freq/W)`` added to the image (``style="add"``, ``delta`` 20/255
    as in the paper), or a stripe image blended in at ``alpha`` (``style="blend"``); see
    :class:`SinusoidalTrigger`. Only ``mode="all2one"`` exists for clean-label attacks.
    """

    name = "sig"
    summary = "sinusoidal stripes, clean-label"
    clean_label = True
    default_poison_rate = 0.8

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, delta: float = 20 / 255,
                 freq: float = 6, style: str = "add", alpha: float = 0.2):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        self.trigger = SinusoidalTrigger(delta, freq, style, alpha)

    def _spec_args(self) -> dict:
        t = self.trigger
        return {"delta": t.delta, "freq": t.freq, "style": t.style, "alpha": t.alpha}


ATTACKS.register(SIG.name, SIG)
