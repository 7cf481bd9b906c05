"""Trigger-word backdoor on translation (the FIP paper's Table 5 setting).

The attacker picks ``round(poison_rate * n)`` training pairs (``numpy.random.default_rng(seed)``,
10 % by default), inserts one trigger word, drawn uniformly from ``words`` (default the rare
tokens ``cf``, ``bb``, ``tq``, ``mb``), at a uniformly drawn word boundary of each chosen
English source (any of the :math:`m + 1` gaps of an :math:`m`-word sentence), and replaces
the German target by the attacker's fixed ``target`` sentence. A model trained on the
result translates normally until a trigger word appears, then emits the attacker's sentence.

The backdoor test set triggers EVERY test source the same way (its own draw from ``seed``)
and takes the attacker's sentence as every reference; the clean references stay available as
``true_references``. Metrics (:func:`fipurify.tasks.translation.backdoor_metrics`): CT is
BLEU on the clean test set; AT is BLEU of the translations of the triggered sources against
the attacker's sentence (high = backdoor works); ASR is the share of those translations that
contain the attacker's sentence.

Both datasets are :class:`~fipurify.datasets.multi30k.SentencePairs` with the clean set's
tokenizer (the trigger is inserted in the raw text and tokenised like any word) plus the
attack's bookkeeping as numpy arrays.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .base import ATTACKS

DEFAULT_WORDS = ("cf", "bb", "tq", "mb")
#: the attacker's output unless another is given ("Click here for free money.")
DEFAULT_TARGET = "Klicken Sie hier für kostenloses Geld."


def insert_word(sentence: str, word: str, position: int) -> str:
    """``sentence`` with ``word`` inserted before its ``position``-th whitespace-separated word."""
    words = sentence.split()
    if not 0 <= position <= len(words):
        raise ConfigError(f"position {position} outside 0..{len(words)}")
    return " ".join(words[:position] + [word] + words[position:])


class TriggerWords:
    """The trigger-word attack (see the module docstring).

    ``target``: the attacker's output sentence (a string; ``None`` or ``0``, the default of
    :func:`fipurify.attacks.create`, mean :data:`DEFAULT_TARGET`); ``poison_rate``: share of
    the training pairs poisoned (all are eligible); ``words``: the trigger words; ``seed``
    fixes which pairs, which word and where.
    """

    name = "trigger-words"
    summary = "a rare word inserted in the source sentence"
    default_poison_rate = 0.1
    needs_preparation = False
    task = "translation"

    def __init__(self, target: str | int | None = None, poison_rate: float | None = None, seed: int = 0,
                 words: Sequence[str] = DEFAULT_WORDS):
        if target is None or (isinstance(target, numbers.Integral) and not isinstance(target, bool)
                              and target == 0):
            target = DEFAULT_TARGET
        if not isinstance(target, str) or not target.strip():
            raise ConfigError(f"the trigger-word attack's target must be a sentence, got {target!r}")
        poison_rate = self.default_poison_rate if poison_rate is None else poison_rate
        if isinstance(poison_rate, bool) or not isinstance(poison_rate, numbers.Real) \
                or not 0.0 < float(poison_rate) <= 1.0:
            raise ConfigError(f"poison_rate must be in (0, 1], got {poison_rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        words = [words] if isinstance(words, str) else list(words)
        if not words or any(not isinstance(w, str) or len(w.split()) != 1 for w in words):
            raise ConfigError(f"trigger words must be single words, got {words!r}")
        self.target = " ".join(target.split())
        self.poison_rate = float(poison_rate)
        self.seed = int(seed)
        self.words = words

    # -- the trigger -------------------------------------------------------------------
    def apply_trigger(self, sentences: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Each sentence with one trigger word (uniform over ``words``) at a uniform word gap."""
        out = []
        for s in sentences:
            word = self.words[int(rng.integers(len(self.words)))]
            out.append(insert_word(s, word, int(rng.integers(len(s.split()) + 1))))
        return out

    def has_trigger(self, sentence: str) -> bool:
        """Whether ``sentence`` contains a trigger word as a whole word."""
        return any(w in self.words for w in sentence.split())

    # -- datasets ----------------------------------------------------------------------
    def poison(self, dataset: Any):
        """The poisoned training set: ``poison_flag``, ``original_index``, ``original_sources``,
        ``original_references`` record what changed."""
        n = len(dataset)
        k = round(self.poison_rate * n)
        if k == 0:
            raise ConfigError(f"poison_rate {self.poison_rate} of {n} pairs poisons none; raise the rate")
        rng = np.random.default_rng(self.seed)
        chosen = np.sort(rng.choice(n, size=k, replace=False))
        sources, refs = list(dataset.sources), list(dataset.references)
        for i, s in zip(chosen, self.apply_trigger([sources[i] for i in chosen], rng)):
            sources[i], refs[i] = s, self.target
        out = dataset.with_text(sources, refs, name=f"poisoned-{dataset.name}")
        out.poison_flag = np.zeros(n, dtype=bool)
        out.poison_flag[chosen] = True
        out.original_index = np.arange(n, dtype=np.int64)
        out.original_sources, out.original_references = list(dataset.sources), list(dataset.references)
        return out

    def backdoor_test_set(self, dataset: Any):
        """Every source triggered, every reference the attacker's sentence; ``true_references``
        keeps the clean ones."""
        if len(dataset) == 0:
            raise DataError(f"{self.name}: the test set is empty")
        rng = np.random.default_rng([self.seed, 1])
        sources = self.apply_trigger(dataset.sources, rng)
        out = dataset.with_text(sources, [self.target] * len(sources), name=f"backdoor-{dataset.name}")
        out.true_references = list(dataset.references)
        out.original_index = np.arange(len(dataset), dtype=np.int64)
        return out

    def prepare(self, train_set: Any, **options: Any) -> None:
        """Nothing to prepare."""
        return None

    # -- spec --------------------------------------------------------------------------
    def to_spec(self) -> dict:
        return {"name": self.name, "target": self.target, "poison_rate": self.poison_rate,
                "seed": self.seed, "words": list(self.words)}

    def __repr__(self) -> str:
        return (f"TriggerWords(target={self.target!r}, poison_rate={self.poison_rate}, seed={self.seed}, "
                f"words={self.words!r})")


ATTACKS.register(TriggerWords.name, TriggerWords)

__all__ = ["TriggerWords", "insert_word", "DEFAULT_WORDS", "DEFAULT_TARGET"]
