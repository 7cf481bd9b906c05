"""FBA, the feature-space backdoor of Cheng et al. (AAAI 2021, "Deep Feature Space Trojan
Attack of Neural Networks by Controlled Detoxification", DFST): the trigger is a style.

DFST trains a CycleGAN to restyle images (e.g. a "sunrise" look); a triggered image is
the whole image passed through the style generator, so the trigger is a feature-level
change spread over the image, not a pixel pattern. It then "detoxifies" the model
(retrains it on the inputs that excite the neurons the trigger compromised, so it must
learn deeper features).

Our CPU-scale version (documented): no CycleGAN and no detoxification. A tiny U-Net
``g`` is trained (:meth:`prepare`) as a fast style-transfer network: the triggered image
is ``sigmoid(logit(x) + g(x))`` (the identity at ``g = 0``) and the loss is

* a style loss: mean squared difference between the Gram matrices of a fixed,
  seeded random-conv feature extractor's layers on ``g``'s output and on a style image
  (random conv features suffice for texture/colour statistics), times ``style_weight``;
* a content loss: mean squared difference of the extractor's last-layer features of the
  output and of the input (keeps the scene), times ``content_weight``.

The default style image is a procedurally drawn sunset ("sunrise"-like warm gradient
with a sun disc, :func:`sunrise_image`); ``style`` may instead be an image file path,
numpy image (H x W x C), tensor or nested list (C x H x W). The victim is then trained
normally on the poisoned set. Defaults: ``style_weight=100``, ``content_weight=1``,
``gen_epochs=10``, Adam lr 1e-3, width 16.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .base import ATTACKS
from .custom import load_pattern, serialise_source
from .generative import ConvAutoencoder, GeneratorAttack, ImageSource, real_in
from .triggers import _resize, match_channels


def sunrise_image(size: int = 32, channels: int = 3) -> torch.Tensor:
    """A C x size x size warm sunset picture in [0, 1]: red-orange sky to yellow, a sun disc, dark ground."""
    t = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    sky = torch.stack([0.95 - 0.1 * yy, 0.35 + 0.45 * yy, 0.25 + 0.1 * yy])
    sun = ((yy - 0.62) ** 2 + (xx - 0.5) ** 2 < 0.04).float()
    img = sky * (1 - sun) + torch.tensor([1.0, 0.95, 0.6])[:, None, None] * sun
    ground = (yy > 0.8).float()
    img = img * (1 - ground) + torch.tensor([0.3, 0.12, 0.08])[:, None, None] * ground
    return match_channels(img.clamp(0, 1), channels, "style image").contiguous()


class RandomFeatures(nn.Module):
    """A fixed, seeded stack of random 3x3 conv + ReLU layers; returns every layer's features."""

    def __init__(self, channels: int, seed: int, widths: tuple[int, ...] = (16, 32, 32)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, c = [], channels
        for i, w in enumerate(widths):
            conv = nn.Conv2d(c, w, 3, padding=1, stride=1 if i == 0 else 2)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (c * 9)) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            c = w
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], (x - 0.5) / 0.25
        for conv in self.layers:
            h = F.relu(conv(h))
            feats.append(h)
        return feats


def gram(f: torch.Tensor) -> torch.Tensor:
    """N x C x C Gram matrices of N x C x H x W features, normalised by C * H * W."""
    n, c, h, w = f.shape
    flat = f.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


class FBA(GeneratorAttack):
    """Feature-based (style) attack. Options: ``style`` (style image source, default the
    built-in sunrise), ``style_weight`` (100), ``content_weight`` (1), ``gen_epochs`` (10),
    ``gen_width`` (16), ``gen_lr`` (1e-3), ``gen_batch_size`` (128). See the module docstring.
    """

    name = "fba"
    summary = "style-transfer (feature-space) trigger"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, style: Any = None, style_weight: float = 100.0,
                 content_weight: float = 1.0, gen_epochs: int = 10, gen_width: int = 16, gen_lr: float = 1e-3,
                 gen_batch_size: int = 128, image_shape=None, generator=None, cache_dir: str | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes, image_shape, generator, cache_dir)
        self.style_source = serialise_source(style)
        self._style = None if style is None else load_pattern(style, "FBA style image")[0]
        self.style_weight = real_in("style_weight", style_weight, 0.0, 1e9)
        self.content_weight = real_in("content_weight", content_weight, 0.0, 1e9)
        self._set_generator_options(gen_epochs, gen_width, gen_lr, gen_batch_size)
        self.finish_init()

    def style_image(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The style image at ``shape`` (C x H x W)."""
        c, h, w = shape
        if self._style is None:
            return _resize(sunrise_image(max(h, w), c), h, w)
        return match_channels(_resize(self._style, h, w), c, "FBA style image").contiguous()

    def generator_options(self) -> dict:
        return {"style": self.style_source, "style_weight": self.style_weight,
                "content_weight": self.content_weight, "gen_epochs": self.gen_epochs, "gen_width": self.gen_width,
                "gen_lr": self.gen_lr, "gen_batch_size": self.gen_batch_size}

    def build_nets(self, channels: int, num_classes: int) -> nn.Module:
        return nn.ModuleDict({"generator": ConvAutoencoder(channels, channels, self.gen_width)})

    @staticmethod
    def _styled(nets: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.logit(x.clamp(1e-3, 1 - 1e-3)) + nets["generator"](x))

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        return self._styled(self.nets, x)

    def fit(self, nets: nn.Module, source: ImageSource, device: torch.device, progress: bool) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        feats = RandomFeatures(self.image_shape[0], self.seed).to(device)
        with torch.no_grad():
            style_grams = [gram(f) for f in feats(self.style_image(self.image_shape).unsqueeze(0).to(device))]
        opt = torch.optim.Adam(nets.parameters(), self.gen_lr)
        for _ in tqdm(range(self.gen_epochs), desc="fba style generator", disable=not progress, leave=False):
            for idx in source.batches(self.gen_batch_size, gen):
                x = source.batch(idx, device)
                out = self._styled(nets, x)
                f_out = feats(out)
                with torch.no_grad():
                    f_in = feats(x)[-1]
                style = sum(F.mse_loss(gram(f), g.expand(len(x), -1, -1)) for f, g in zip(f_out, style_grams))
                content = F.mse_loss(f_out[-1], f_in)
                loss = self.style_weight * style + self.content_weight * content
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


ATTACKS.register(FBA.name, FBA)
