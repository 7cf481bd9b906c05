"""Multi30k (Elliott et al. 2016), English -> German: sentence pairs as subword-id tensors.

``load("multi30k", split="train" | "val" | "test")`` reads ``multi30k/{train,val,
test_2016_flickr}.{en,de}.gz`` under the data root (29,000 / 1,014 / 1,000 pairs of raw
UTF-8 sentences, line ``i`` of the ``.en`` file translating line ``i`` of the ``.de`` one)
and returns a :class:`SentencePairs`. Its tokenizer is one byte-level BPE vocabulary for both
languages (:class:`~fipurify.text.SubwordTokenizer`, 8,000 entries by default) trained on the
training split's English and German sentences; it is cached as JSON under
``$FIPURIFY_CACHE/text/`` (keyed by the training files' bytes and the vocabulary size), so
every split and every run use the same ids. ``tokenizer=`` takes a saved JSON file (or a
tokenizer) instead, e.g. the one stored beside a model.

Items are ``(source ids, target ids)``: 1-D int64 tensors ``[BOS, w_1 .. w_n, EOS]``.
Sentences differ in length, so batches need :func:`pad_pairs` (``dataset.collate_fn``).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..text.padding import pad_pairs
from ..text.tokenizer import BOS_ID, EOS_ID, SubwordTokenizer
from .base import DATASETS, DatasetInfo, check_options
from .roots import cache_dir, resolve_root

#: split name -> file stem in the multi30k folder
SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}
SOURCE_LANG, TARGET_LANG = "en", "de"


def _ids(tokens: list[int], max_len: int | None) -> Tensor:
    if max_len is not None:
        tokens = tokens[:max_len - 2]
    return torch.tensor([BOS_ID, *tokens, EOS_ID], dtype=torch.int64)


class SentencePairs(Dataset):
    """Parallel sentences (``sources[i]`` translates to ``references[i]``) and their ids.

    ``dataset[i]`` is ``(source ids, target ids)`` (see the module docstring); sentences
    longer than ``max_len`` ids (BOS and EOS included) are cut. The raw text stays
    available (``sources``, ``references``) for attacks and for BLEU on detokenised output.
    ``task`` names the :class:`~fipurify.tasks.base.Task` ("translation"); ``collate_fn``
    pads a batch (give it to every DataLoader over this dataset).
    """

    task = "translation"
    collate_fn = staticmethod(pad_pairs)

    def __init__(self, sources: Sequence[str], references: Sequence[str], tokenizer: SubwordTokenizer,
                 name: str = "pairs", max_len: int | None = 128):
        if len(sources) != len(references):
            raise DataError(f"{name}: {len(sources)} source sentences but {len(references)} references")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3):
            raise ConfigError(f"max_len must be an integer >= 3 (BOS, one token, EOS), got {max_len!r}")
        self.sources = list(sources)
        self.references = list(references)
        self.tokenizer = tokenizer
        self.name = name
        self.max_len = max_len
        self.source_ids = [_ids(t, max_len) for t in tokenizer.encode_batch(self.sources)] if sources else []
        self.target_ids = [_ids(t, max_len) for t in tokenizer.encode_batch(self.references)] if sources else []

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.source_ids[index], self.target_ids[index]

    def with_text(self, sources: Sequence[str], references: Sequence[str], name: str | None = None) -> "SentencePairs":
        """Another dataset of the same kind and tokenizer holding the given sentences."""
        return SentencePairs(sources, references, self.tokenizer, name or self.name, self.max_len)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> "SentencePairs":
        """A new dataset holding only ``indices`` (same tokenizer)."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64)]
        return self.with_text([self.sources[i] for i in idx], [self.references[i] for i in idx], name)

    def __repr__(self) -> str:
        return f"SentencePairs(name={self.name!r}, n={len(self)}, vocab={self.tokenizer.vocab_size})"


def _read_lines(path: Path) -> list[str]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [line.strip() for line in f]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def read_split(folder: Path, split: str) -> tuple[list[str], list[str]]:
    """The raw (English, German) sentences of ``split``; DataError naming a missing file."""
    if split not in SPLIT_FILES:
        raise ConfigError(f"multi30k has splits {', '.join(SPLIT_FILES)}, not {split!r}")
    paths = [folder / f"{SPLIT_FILES[split]}.{lang}.gz" for lang in (SOURCE_LANG, TARGET_LANG)]
    for p in paths:
        if not p.is_file():
            raise DataError(f"multi30k: {p} not found (expected {SPLIT_FILES[split]}.en.gz and .de.gz "
                            f"in {folder})")
    src, tgt = (_read_lines(p) for p in paths)
    if len(src) != len(tgt):
        raise DataError(f"multi30k {split}: {len(src)} English but {len(tgt)} German lines")
    return src, tgt


def multi30k_tokenizer(folder: Path, vocab_size: int = 8000, cache: bool = True) -> SubwordTokenizer:
    """The BPE tokenizer trained on the training split's English and German text (cached as JSON)."""
    from .cache import content_key

    files = [folder / f"train.{lang}.gz" for lang in (SOURCE_LANG, TARGET_LANG)]
    path = None
    if cache and all(f.is_file() for f in files):
        key = content_key(files[0], content_key(files[1]), "bpe-bytelevel", vocab_size)
        path = cache_dir() / "text" / f"multi30k-bpe{vocab_size}-{key[:16]}.json"
        if path.is_file():
            try:
                return SubwordTokenizer.load(path)
            except DataError:
                pass  # unreadable: trained again and rewritten
    src, tgt = read_split(folder, "train")
    tok = SubwordTokenizer.train(src + tgt, vocab_size)
    if path is not None:
        try:
            tok.save(path)
        except OSError:
            pass  # a read-only cache is not an error
    return tok


def load_multi30k(root: Any = None, split: str = "train", vocab_size: int = 8000,
                  tokenizer: SubwordTokenizer | str | Path | None = None, max_len: int | None = 128,
                  cache: bool = True) -> SentencePairs:
    """Multi30k ``split`` as :class:`SentencePairs` (see the module docstring)."""
    folder = resolve_root(root) / "multi30k"
    src, tgt = read_split(folder, split)
    if tokenizer is None:
        tokenizer = multi30k_tokenizer(folder, vocab_size, cache)
    elif not isinstance(tokenizer, SubwordTokenizer):
        tokenizer = SubwordTokenizer.load(tokenizer)
    return SentencePairs(src, tgt, tokenizer, f"multi30k-{split}", max_len)


def _load(root, split: str | None, **options) -> SentencePairs:
    check_options("multi30k", load_multi30k, options)
    return load_multi30k(root, split=split or "train", **options)


DATASETS.register("multi30k", _load, info=DatasetInfo("multi30k", None, None, None))

__all__ = ["SentencePairs", "load_multi30k", "multi30k_tokenizer", "pad_pairs", "read_split", "SPLIT_FILES"]
