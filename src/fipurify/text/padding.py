"""Batching variable-length token sequences: right padding with the PAD id.

A DataLoader's default collate stacks equal-sized tensors only; sentences differ in length,
so translation batches are collated by :func:`pad_pairs` (the datasets' and the
translation task's ``collate_fn``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .tokenizer import PAD_ID


def pad_ids(rows: Sequence[Tensor], pad_id: int = PAD_ID) -> Tensor:
    """1-D id tensors as one ``N x max_len`` int64 batch, right-padded with ``pad_id``."""
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=pad_id)


def pad_pairs(batch: Sequence[tuple[Tensor, Tensor]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """Collate ``(source, target)`` id vectors into two right-padded ``N x L`` int64 batches."""
    return pad_ids([s for s, _ in batch], pad_id), pad_ids([t for _, t in batch], pad_id)


__all__ = ["pad_ids", "pad_pairs"]
