"""Text utilities for sequence tasks: a subword tokenizer, padded batches and corpus BLEU.

The libraries behind them (HF ``tokenizers``, ``sacrebleu``; the ``text`` extra) are imported
only when a tokenizer is trained or loaded, or BLEU is computed, so fipurify imports without them.
"""
from __future__ import annotations

from .bleu import corpus_bleu
from .padding import pad_ids, pad_pairs
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, SubwordTokenizer

__all__ = ["SubwordTokenizer", "corpus_bleu", "pad_ids", "pad_pairs", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "SPECIAL_TOKENS"]
