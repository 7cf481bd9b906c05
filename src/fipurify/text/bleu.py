"""Corpus BLEU (Papineni et al. 2002) of detokenised sentences, computed by sacrebleu.

.. math:: \\mathrm{BLEU} = \\mathrm{BP} \\cdot \\exp\\Big(\\tfrac14 \\sum_{n=1}^{4} \\log p_n\\Big),
   \\quad \\mathrm{BP} = \\min\\big(1, e^{1 - r/c}\\big)

with :math:`p_n` the clipped n-gram precision over the corpus, :math:`c` the hypotheses' and
:math:`r` the references' length in tokens. sacrebleu tokenises both sides itself (its default
``13a`` tokenizer), so the score is comparable across papers and independent of fipurify's
subword vocabulary; it is on the usual 0 - 100 scale.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError, DataError


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """BLEU (0 - 100) of ``hypotheses`` against one reference each (sacrebleu's defaults)."""
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise DataError("BLEU of an empty corpus is undefined")
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("BLEU needs sacrebleu: pip install 'fipurify[text]'") from None
    return float(BLEU().corpus_score(list(hypotheses), [list(references)]).score)


__all__ = ["corpus_bleu"]
