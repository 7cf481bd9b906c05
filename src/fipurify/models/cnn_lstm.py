"""CNN-LSTM video classifier: a small CNN on every frame, an LSTM over the frames, a linear head.

The classic recipe for action recognition on a budget (Donahue et al., 2015, "Long-term
recurrent convolutional networks"), at the size of the CIFAR-10 stand-in clips. For a clip
:math:`x \\in [0, 1]^{T \\times C \\times H \\times W}`:

.. math::  f_t = \\mathrm{ReLU}(W_p \\, \\mathrm{vec}(\\mathrm{CNN}(x_t))), \\quad
           h_t = \\mathrm{LSTM}(f_t, h_{t-1}), \\quad z = W h_T + b.

The CNN is three conv3x3-BN-ReLU-maxpool2 stages (widths ``w, 2w, 4w``) and an adaptive
average pool to 4 x 4; the 4 x 4 map is flattened, not pooled to one vector, so a frame's
features keep WHERE things are (motion is a change of place). ``features(x)`` is
:math:`h_T` (the classifier's input) and ``classifier`` the final ``nn.Linear``, as for the
image models.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .normalize import make_normalize
from .registry import MODELS


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.MaxPool2d(2))


@MODELS.register("cnn-lstm")
class CNNLSTM(nn.Module):
    """Takes ``(N, T, C, H, W)`` clips in [0, 1]; returns ``(N, num_classes)`` logits.

    Args:
        num_classes: number of output logits.
        in_channels: channels of a frame.
        input_size: nominal frame side (recorded; the adaptive pool accepts any side >= 8).
        width: channels of the first CNN stage (then 2x, 4x).
        hidden: size of the per-frame projection and of the LSTM state.
        mean, std: per-channel normalisation of every frame (default 0.5/0.5).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: int = 16,
                 hidden: int = 64, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if width < 1 or hidden < 1:
            raise ConfigError(f"cnn-lstm width and hidden must be >= 1, got {width}, {hidden}")
        self.input_size = input_size
        self.normalize = make_normalize(in_channels, mean, std)
        self.cnn = nn.Sequential(_stage(in_channels, width), _stage(width, 2 * width), _stage(2 * width, 4 * width),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.project = nn.Sequential(nn.Linear(4 * width * 16, hidden), nn.ReLU())
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame features ``(N, T, hidden)`` of clips ``(N, T, C, H, W)``."""
        if x.ndim != 5:
            raise ValueError(f"cnn-lstm takes clips N x T x C x H x W, got shape {tuple(x.shape)}")
        n, t = x.shape[:2]
        frames = self.normalize(x.reshape(n * t, *x.shape[2:]))
        return self.project(self.cnn(frames)).reshape(n, t, -1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The LSTM's last hidden state ``(N, hidden)``: the classifier's input."""
        _, (h, _) = self.lstm(self.frame_features(x))
        return h[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


__all__ = ["CNNLSTM"]
