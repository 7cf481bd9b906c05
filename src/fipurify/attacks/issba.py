"""ISSBA (Li et al., ICCV 2021): invisible, sample-specific triggers from a steganography encoder.

ISSBA trains a StegaStamp encoder-decoder on benign images: the encoder adds a residual
to an image that hides a bit string, the decoder recovers the string from the encoded
image, and an image-fidelity loss keeps the residual small. Poisoned images are the
training images encoded with one fixed attacker string (e.g. the target label's name);
because the residual depends on the image, every image gets its own trigger.

Our CPU-scale version (documented): a tiny U-Net encoder sees the image plus the code
(a linear map of the bits to a 4 x 4 x 4 map, upsampled to the image size); its output
is bounded, ``residual = eps * tanh(.)``, so ``|x' - x| <= eps`` (StegaStamp has no hard
bound; its ImageNet residuals average ~27 dB PSNR, RMSE ~0.045, hence the default
``eps=0.05``). Training (:meth:`prepare`) uses a random code per image (so the encoder
learns to write any code, as StegaStamp does) with loss
``BCE(decoder(x + residual), bits) + img_weight * mean((residual / eps)^2)``; no LPIPS,
critic or image distortions. The attacker code is ``code_bits`` bits of
SHA-256(``secret``); ``secret`` defaults to the target label index as a string (the
paper's example: the target label). The victim is then trained normally on the
poisoned set. Defaults: ``code_bits=32`` (StegaStamp: 100), ``gen_epochs=10``,
``img_weight=0.1``, Adam lr 1e-3.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from .base import ATTACKS
from .generative import ConvAutoencoder, GeneratorAttack, ImageSource, SmallCNN, positive_int, real_in

_CODE_MAP = (4, 4, 4)  # channels x height x width of the code map before upsampling


class CodeEncoder(nn.Module):
    """Image + bit code -> unbounded residual (the caller bounds it)."""

    def __init__(self, channels: int, bits: int, width: int):
        super().__init__()
        self.channels = channels
        self.project = nn.Linear(bits, (_CODE_MAP[0] + channels) * _CODE_MAP[1] * _CODE_MAP[2])
        self.body = ConvAutoencoder(channels + _CODE_MAP[0], channels, width)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        code = self.project(bits * 2 - 1).view(len(x), _CODE_MAP[0] + self.channels, *_CODE_MAP[1:])
        code = F.interpolate(code, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # the network sees image + code; a direct code term gives it an easy start
        return self.body(torch.cat([x, code[:, :_CODE_MAP[0]]], dim=1)) + code[:, _CODE_MAP[0]:]


def secret_bits(secret: str, bits: int) -> torch.Tensor:
    """The first ``bits`` bits of SHA-256(``secret``), repeated if more than 256 are asked for."""
    digest = hashlib.sha256(secret.encode("utf-8")).digest()
    allbits = [(byte >> (7 - i)) & 1 for byte in digest for i in range(8)]
    return torch.tensor([allbits[i % 256] for i in range(bits)], dtype=torch.float32)


class ISSBA(GeneratorAttack):
    """ISSBA attack. Options: ``eps`` (L_inf bound of the residual, 0.05), ``secret`` (attacker
    string, default the target label index), ``code_bits`` (32), ``img_weight`` (0.1),
    ``gen_epochs`` (10), ``gen_width`` (16), ``gen_lr`` (1e-3), ``gen_batch_size`` (128).
    """

    name = "issba"
    summary = "sample-specific invisible residuals"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, eps: float = 0.05, secret: str | None = None,
                 code_bits: int = 32, img_weight: float = 0.1, gen_epochs: int = 10, gen_width: int = 16,
                 gen_lr: float = 1e-3, gen_batch_size: int = 128, image_shape=None, generator=None,
                 cache_dir: str | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes, image_shape, generator, cache_dir)
        self.eps = real_in("eps", eps, 0.0, 1.0, low_open=True)
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise ConfigError(f"secret must be a non-empty string, got {secret!r}")
        self.secret = secret
        self.code_bits = positive_int("code_bits", code_bits)
        self.img_weight = real_in("img_weight", img_weight, 0.0, 1e6)
        self._set_generator_options(gen_epochs, gen_width, gen_lr, gen_batch_size)
        self.finish_init()

    @property
    def code(self) -> torch.Tensor:
        """The attacker's bit code (float 0/1 vector of ``code_bits``)."""
        return secret_bits(self.secret if self.secret is not None else str(self.target), self.code_bits)

    def generator_options(self) -> dict:
        return {"eps": self.eps, "secret": self.secret, "code_bits": self.code_bits, "img_weight": self.img_weight,
                "gen_epochs": self.gen_epochs, "gen_width": self.gen_width, "gen_lr": self.gen_lr,
                "gen_batch_size": self.gen_batch_size}

    def generator_config(self) -> dict:
        cfg = super().generator_config()
        # the secret is only used when poisoning: the encoder is trained on random codes
        cfg["options"] = {k: v for k, v in cfg["options"].items() if k != "secret"}
        return cfg

    def build_nets(self, channels: int, num_classes: int) -> nn.Module:
        # the decoder is saved too, so the hidden code can be read back (see decode)
        return nn.ModuleDict({"encoder": CodeEncoder(channels, self.code_bits, self.gen_width),
                              "decoder": SmallCNN(channels, self.code_bits, self.gen_width, pool=4)})

    def _residual(self, nets: nn.Module, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return self.eps * torch.tanh(nets["encoder"](x, bits))

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.code.to(x.device).expand(len(x), -1)
        return x + self._residual(self.nets, x, bits)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The bits the decoder reads from images ``x`` (N x code_bits, 0/1 floats)."""
        self._require_prepared("decoding")
        dev = next(self.nets.parameters()).device
        with torch.no_grad():
            return (self.nets["decoder"](x.to(dev)) > 0).float().to(x.device)

    def fit(self, nets: nn.Module, source: ImageSource, device: torch.device, progress: bool) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(nets.parameters(), self.gen_lr)
        total = self.gen_epochs * max(1, (len(source) + self.gen_batch_size - 1) // self.gen_batch_size)
        step = 0
        for _ in tqdm(range(self.gen_epochs), desc="issba encoder", disable=not progress, leave=False):
            for idx in source.batches(self.gen_batch_size, gen):
                # StegaStamp-style schedule: no image loss while the code is learnt (first half),
                # then its weight ramps up linearly to img_weight
                ramp = min(1.0, max(0.0, 2.0 * step / total - 1.0))
                step += 1
                x = source.batch(idx, device)
                bits = torch.randint(0, 2, (len(x), self.code_bits), generator=gen).float().to(device)
                r = self._residual(nets, x, bits)
                encoded = (x + r).clamp(0.0, 1.0)
                loss = F.binary_cross_entropy_with_logits(nets["decoder"](encoded), bits) \
                    + ramp * self.img_weight * (r / self.eps).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


ATTACKS.register(ISSBA.name, ISSBA)
