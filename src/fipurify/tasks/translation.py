"""Machine translation with a sequence-to-sequence model: the :class:`Translation` task.

Items are ``(source ids, target ids)``, 1-D int64 tensors ``[BOS, w_1 .. w_n, EOS]``
(:class:`~fipurify.datasets.multi30k.SentencePairs`); batches are right-padded with PAD by the
dataset's ``collate_fn``.

* :meth:`Translation.forward` is teacher forcing: the model sees the source and the target
  shifted right, :math:`y_{<t}` = ``y[:, :-1]``, and predicts ``y[:, 1:]``. The task then fixes
  what comes after a sentence: at a position whose input is EOS or PAD the output puts all mass
  on PAD, elsewhere PAD gets none (logit :data:`MASKED`, finite so that divergences between two
  outputs stay finite). So the output is one proper distribution over padded target sequences.
* :meth:`Translation.per_sample_loss` is the token cross-entropy averaged over each sentence's
  real target tokens (words and EOS; padding ignored):
  :math:`\\ell_i = -\\frac{1}{T_i} \\sum_{t=1}^{T_i} \\log p_\\theta(y_{i,t} | y_{i,<t}, x_i)`;
  :meth:`~fipurify.tasks.base.Task.loss` is its batch mean.
* :meth:`Translation.sample_targets` draws each target token from the teacher-forced output
  distribution, :math:`\\hat y_t \\sim p_\\theta(\\cdot | y_{<t}, x)`, independently per position
  (not an ancestral sample of a whole sentence: the prefix stays the true one), and prepends
  BOS, so :math:`\\hat y` has the shape of ``y`` and PAD exactly where the true sentence has
  ended. The true Fisher then uses :math:`\\nabla \\ell(\\hat y)` as the score, which is the
  length-normalised score :math:`\\frac1{T_i} \\nabla \\log p_\\theta(\\hat y | x)`.
* :meth:`Translation.augment` deletes each source subword token with probability ``p``
  (default 0.1; BOS and EOS stay), the text counterpart of random crops.
* :meth:`Translation.score` is corpus BLEU / 100 of the greedy translations (detokenised)
  against the dataset's raw references, computed by sacrebleu.

:func:`backdoor_metrics` gives CT, AT and ASR of a model under a trigger-word attack.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ConfigError, DataError
from ..text.padding import pad_pairs
from ..text.tokenizer import BOS_ID, EOS_ID, PAD_ID
from .base import TASKS, Task

#: the logit given to impossible tokens (PAD inside a sentence, anything but PAD after it)
MASKED = -1.0e4


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sentence_pairs(dataset: Dataset) -> tuple[Any, list[int]]:
    """``(the SentencePairs-like dataset behind dataset, the indices of dataset's items in it)``.

    Looks through (nested) :class:`torch.utils.data.Subset` wrappers, e.g. a defense's
    hold-out split, to the dataset that carries the ``tokenizer`` and the raw ``references``.
    """
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    if getattr(dataset, "tokenizer", None) is None or getattr(dataset, "references", None) is None:
        raise DataError("translation datasets must carry their tokenizer and raw references "
                        "(dataset.tokenizer, dataset.references), e.g. SentencePairs")
    return dataset, indices


@TASKS.register("translation")
class Translation(Task):
    """Sequence-to-sequence translation; see the module docstring for each method."""

    name = "translation"
    metric = "BLEU"
    #: batches of variable-length pairs need padding: give this to every DataLoader of the task
    collate_fn = staticmethod(pad_pairs)

    def __init__(self, pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                 max_len: int | None = None):
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        #: longest translation :meth:`score` decodes (None: the model's default)
        self.max_len = max_len

    def check_sample(self, x: Any, y: Any) -> None:
        for what, v in (("source", x), ("target", y)):
            if not torch.is_tensor(v) or v.ndim != 1 or v.dtype != torch.int64:
                got = f"shape {tuple(v.shape)} {v.dtype}" if torch.is_tensor(v) else type(v).__name__
                raise DataError(f"translation {what}s must be 1-D int64 token-id tensors, got {got}")
            if len(v) < 2 or int(v[0]) != self.bos_id or int(v[-1]) != self.eos_id:
                raise DataError(f"translation {what}s must run from BOS ({self.bos_id}) to EOS ({self.eos_id})")

    # -- model output --------------------------------------------------------------------
    def forward(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            raise ConfigError("translation models are run with the target (teacher forcing)")
        tgt_in = y[:, :-1]
        logits = model(x, tgt_in)
        ended = tgt_in.eq(self.eos_id) | tgt_in.eq(self.pad_id)  # N x T
        is_pad = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
        is_pad[self.pad_id] = True
        # after the end: PAD certain (logit 0, others MASKED); inside: PAD impossible
        out = logits.masked_fill(ended.unsqueeze(-1) | is_pad, MASKED)
        out[..., self.pad_id] = ended.to(out.dtype) * -MASKED + MASKED
        return out

    def per_sample_loss(self, output: Tensor, y: Tensor) -> Tensor:
        target = y[:, 1:]
        nll = F.cross_entropy(output.transpose(1, 2), target, ignore_index=self.pad_id, reduction="none")
        count = target.ne(self.pad_id).sum(1).clamp(min=1)
        return nll.sum(1) / count

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, t, v = output.shape
        probs = torch.softmax(output.detach().float(), dim=-1).reshape(n * t, v)
        device = generator.device if generator is not None else probs.device
        drawn = torch.multinomial(probs.to(device), 1, generator=generator).reshape(n, t).to(output.device)
        bos = torch.full((n, 1), self.bos_id, dtype=torch.long, device=output.device)
        return torch.cat([bos, drawn], dim=1)

    # -- augmentation ----------------------------------------------------------------------
    def augment(self, x: Tensor, generator: torch.Generator | None = None, *, p: float = 0.1,
                **options: Any) -> Tensor:
        """Delete each source token (not BOS, EOS, PAD) with probability ``p``; re-pad the rows."""
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"token deletion probability must be in [0, 1), got {p}")
        special = x.eq(self.bos_id) | x.eq(self.eos_id)
        drop = torch.rand(x.shape, generator=generator).to(x.device) < p
        keep = x.ne(self.pad_id) & (special | ~drop)
        # stable sort puts each row's kept tokens first, in order
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        out = torch.gather(x, 1, order)
        lengths = keep.sum(1)
        out = out.masked_fill(torch.arange(x.size(1), device=x.device)[None, :] >= lengths[:, None], self.pad_id)
        return out[:, : int(lengths.max())].contiguous() if len(x) else x

    # -- evaluation ------------------------------------------------------------------------
    def translate(self, model: nn.Module, dataset: Dataset, batch_size: int = 256,
                  max_len: int | None = None) -> list[str]:
        """Greedy, detokenised translations of every source in ``dataset`` (in order), at most
        ``max_len`` tokens long (default :attr:`max_len`)."""
        tokenizer = sentence_pairs(dataset)[0].tokenizer
        decode = getattr(model, "greedy_decode", None)
        if decode is None:
            raise ConfigError(f"{type(model).__name__} has no greedy_decode(src, max_len) method")
        device = _device_of(model)
        max_len = self.max_len if max_len is None else max_len
        out: list[str] = []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=pad_pairs)
        for x, _ in loader:
            ids = decode(x.to(device), max_len).cpu().tolist()
            out.extend(tokenizer.decode(row[: row.index(self.eos_id)] if self.eos_id in row else row)
                       for row in ids)
        return out

    def score(self, model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
        from ..text.bleu import corpus_bleu
        return corpus_bleu(self.translate(model, dataset, batch_size), references(dataset)) / 100.0


def references(dataset: Dataset) -> list[str]:
    """The raw reference sentences of ``dataset``'s items (through Subset wrappers)."""
    base, indices = sentence_pairs(dataset)
    return [base.references[i] for i in indices]


def contains_share(hypotheses: Sequence[str], targets: Sequence[str]) -> float:
    """Share of hypotheses containing their target as a substring (whitespace-normalised)."""
    if len(hypotheses) != len(targets) or not hypotheses:
        raise DataError(f"{len(hypotheses)} hypotheses for {len(targets)} targets")
    norm = lambda s: " ".join(s.split())  # noqa: E731
    return sum(norm(t) in norm(h) for h, t in zip(hypotheses, targets)) / len(hypotheses)


def backdoor_metrics(model: nn.Module, clean_test: Dataset, backdoor_test: Dataset | None = None,
                     batch_size: int = 256, task: Translation | None = None) -> dict[str, float]:
    """Clean and attack metrics of a translation model, all in [0, 1]:

    * ``CT``: BLEU/100 on the clean test set against its references;
    * ``AT``: BLEU/100 on the triggered test set against the ATTACKER's output (its
      ``references``, see :mod:`fipurify.attacks.trigger_words`): high while the backdoor
      works, low once it is removed;
    * ``ASR``: share of triggered translations that contain the attacker's sentence.
    """
    from ..text.bleu import corpus_bleu

    task = task or Translation()
    out = {"CT": task.score(model, clean_test, batch_size)}
    if backdoor_test is not None:
        hyps = task.translate(model, backdoor_test, batch_size)
        target = references(backdoor_test)
        out["AT"] = corpus_bleu(hyps, target) / 100.0
        out["ASR"] = contains_share(hyps, target)
    return out


__all__ = ["Translation", "backdoor_metrics", "contains_share", "references", "sentence_pairs", "MASKED"]
