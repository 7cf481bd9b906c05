"""Batch-wise training augmentation on tensors (no torchvision needed)."""
from __future__ import annotations

import torch


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per image of an N x C x H x W batch."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        # Gather each crop through index arithmetic: one op for the whole batch.
        rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # n x h
        cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # n x w
        idx_n = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()
