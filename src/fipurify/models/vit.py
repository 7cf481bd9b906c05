"""A small Vision Transformer (Dosovitskiy et al., 2021) for small images.

Written without ``nn.MultiheadAttention`` on purpose: attention uses one ``qkv``
``nn.Linear`` and an output ``nn.Linear``, so every weight matrix of the model is a
Conv2d or Linear weight. Defences that re-parametrise every Conv/Linear weight
(``torch.nn.utils.parametrize``) then cover the whole network; the fused
``in_proj_weight`` of ``nn.MultiheadAttention`` would escape them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .normalize import make_normalize
from .registry import MODELS


class Attention(nn.Module):
    """Multi-head self-attention with explicit ``qkv`` and ``proj`` linear layers."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # (N, T, 3, H, D/H) -> three tensors of shape (N, H, T, D/H)
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    """Linear-GELU-Linear feed-forward block."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT with a class token; takes ``(N, C, input_size, input_size)`` images in [0, 1].

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        input_size: image side; must be a multiple of ``patch_size`` (fixes the position embedding).
        patch_size: side of the square patches.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        dropout: dropout probability in attention and MLP.
        mean, std: per-channel normalisation applied inside the model (default 0.5/0.5).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, patch_size: int = 4,
                 dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if patch_size < 1 or input_size % patch_size != 0:
            raise ConfigError(f"vit_small input_size ({input_size}) must be a multiple of patch_size ({patch_size})")
        if dim < 1 or depth < 1 or heads < 1:
            raise ConfigError(f"vit_small dim, depth and heads must be >= 1, got {dim}, {depth}, {heads}")
        if dim % heads != 0:
            raise ConfigError(f"vit_small dim ({dim}) must be divisible by heads ({heads})")
        if mlp_ratio <= 0:
            raise ConfigError(f"vit_small mlp_ratio must be positive, got {mlp_ratio}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"vit_small dropout must be in [0, 1), got {dropout}")
        self.input_size = input_size
        self.normalize = make_normalize(in_channels, mean, std)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        num_patches = (input_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, max(1, round(dim * mlp_ratio)), dropout)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Small truncated-normal init as in the ViT paper; PyTorch's default Linear init trains worse here.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised class token after the last block (the classifier's input), shape ``(N, dim)``."""
        if x.dim() == 4 and x.shape[-2:] != (self.input_size, self.input_size):
            raise DataError(f"this ViT was built for {self.input_size}x{self.input_size} images, "
                            f"got {x.shape[-2]}x{x.shape[-1]}")
        tokens = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (N, P, dim)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("vit_small", ViT)
MODELS.alias("vit", "vit_small")
