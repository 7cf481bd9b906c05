"""A small Transformer encoder-decoder (Vaswani et al. 2017) for machine translation.

Source and target share one subword vocabulary, so one embedding matrix :math:`E \\in
\\mathbb{R}^{V \\times d}` embeds both sides and is also the output projection (weight tying,
Press & Wolf 2017):

.. math:: h^{enc} = \\mathrm{Enc}(\\sqrt d\\, E[x] + P),\\quad
          \\mathrm{logits}_t = \\mathrm{Dec}(\\sqrt d\\, E[y_{<t}] + P,\\ h^{enc})_t\\, E^\\top + b

with :math:`P` sinusoidal position encodings; the decoder attends causally to the target
prefix and to every non-padding source position. Layers are pre-norm
(``norm_first``), which trains stably without warm-up tricks at this size.

``forward(src, tgt_in)`` gives ``N x T x V`` logits for the target prefix ``tgt_in``
(teacher forcing: the caller feeds the target shifted right, starting with BOS);
:meth:`TransformerMT.greedy_decode` translates a source batch token by token.

Registered as ``transformer-mt``. :func:`fipurify.models.create` passes every model the
image arguments ``num_classes``, ``in_channels``, ``input_size``, ``mean`` and ``std``; this
model takes and ignores them (its output size is ``vocab_size``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .registry import MODELS

# The token ids fipurify's tokenizer reserves (fipurify.text.tokenizer), repeated as defaults so
# that building a model needs no text library.
_PAD, _BOS, _EOS = 0, 1, 2


def _differentiable_attention():
    """Restrict scaled-dot-product attention to the math kernel when autograd is recording
    (twice-differentiable); a no-op context otherwise."""
    if not torch.is_grad_enabled():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """``length x dim``: :math:`P_{p,2i} = \\sin(p / 10000^{2i/d})`, :math:`P_{p,2i+1} = \\cos(\\cdot)`."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class TransformerMT(nn.Module):
    """Encoder-decoder Transformer with one shared, tied embedding (see the module docstring).

    ``d_model`` width, ``heads`` attention heads, ``layers`` encoder and as many decoder
    layers, ``ff`` feed-forward width, ``max_positions`` longest sequence; ``pad_id``,
    ``bos_id``, ``eos_id`` the tokenizer's special ids.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 mean: Any = None, std: Any = None, vocab_size: int = 8000, d_model: int = 256,
                 heads: int = 4, layers: int = 3, ff: int = 1024, dropout: float = 0.1,
                 max_positions: int = 256, pad_id: int = _PAD, bos_id: int = _BOS, eos_id: int = _EOS):
        super().__init__()
        if d_model % heads:
            raise ConfigError(f"d_model {d_model} must be divisible by heads {heads}")
        if d_model % 2:
            raise ConfigError(f"d_model must be even (sinusoidal positions), got {d_model}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        for key, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= value < vocab_size:
                raise ConfigError(f"{key} {value} out of range for vocab_size {vocab_size}")
        self.vocab_size, self.d_model, self.max_positions = vocab_size, d_model, max_positions
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.embedding.weight, 0.0, d_model ** -0.5)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()
        self.register_buffer("positions", sinusoidal_positions(max_positions, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

        def enc_layer() -> nn.Module:
            return nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)

        def dec_layer() -> nn.Module:
            return nn.TransformerDecoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)

        self.encoder = nn.TransformerEncoder(enc_layer(), layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec_layer(), layers, norm=nn.LayerNorm(d_model))
        self.output_bias = nn.Parameter(torch.zeros(vocab_size))

    # -- pieces ----------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """Scaled token embeddings plus positions, ``N x L x d``."""
        if ids.size(1) > self.max_positions:
            raise ConfigError(f"sequence of {ids.size(1)} tokens exceeds max_positions {self.max_positions}")
        return self.dropout(self.embedding(ids) * math.sqrt(self.d_model) + self.positions[: ids.size(1)])

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """``(memory N x S x d, source padding mask N x S)``."""
        pad = src.eq(self.pad_id)
        return self.encoder(self.embed(src), src_key_padding_mask=pad), pad

    def decode(self, memory: Tensor, src_pad: Tensor, tgt_in: Tensor) -> Tensor:
        """Logits ``N x T x V`` of the next token after each prefix of ``tgt_in``."""
        t = tgt_in.size(1)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        h = self.decoder(self.embed(tgt_in), memory, tgt_mask=causal,
                         tgt_key_padding_mask=tgt_in.eq(self.pad_id), memory_key_padding_mask=src_pad)
        return h @ self.embedding.weight.t() + self.output_bias

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``N x T x V`` (``tgt_in``: the target shifted right, BOS first).

        Attention runs on PyTorch's plain ("math") kernel while gradients are recorded: the
        fused CPU kernel has no double backward, which FIP's Tr(F) penalty (a gradient of a
        gradient norm) needs; sentences are short, so the T x T attention matrices are small.
        """
        with _differentiable_attention():
            memory, src_pad = self.encode(src)
            return self.decode(memory, src_pad, tgt_in)

    def stepper(self, memory: Tensor, src_pad: Tensor) -> "IncrementalDecoder":
        """An :class:`IncrementalDecoder` over ``memory`` (eval mode: no dropout)."""
        return IncrementalDecoder(self, memory, src_pad)

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, max_len: int | None = None) -> Tensor:
        """Greedy translations ``N x L`` (no BOS; each row ends at its EOS, padded after it).

        Each step appends :math:`\\arg\\max_{w \\ne \\mathrm{pad}} p(w | y_{<t}, x)`; a row is
        finished at its EOS, and decoding stops when all rows are finished or after
        ``max_len`` tokens (default ``2 S + 10`` for sources of ``S`` ids, at most
        ``max_positions - 1``). Each step runs the decoder on the newest token only
        (:meth:`stepper`), so a sentence of ``L`` tokens costs :math:`O(L)` layer passes.
        """
        was_training = self.training
        self.eval()
        try:
            n = src.size(0)
            limit = max_len if max_len is not None else 2 * src.size(1) + 10
            limit = max(1, min(limit, self.max_positions - 1))
            memory, src_pad = self.encode(src)
            step = self.stepper(memory, src_pad)
            ys = torch.full((n, 1), self.bos_id, dtype=torch.long, device=src.device)
            done = torch.zeros(n, dtype=torch.bool, device=src.device)
            for _ in range(limit):
                logits = step(ys[:, -1])
                logits[:, self.pad_id] = float("-inf")
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
                ys = torch.cat([ys, nxt[:, None]], dim=1)
                done |= nxt.eq(self.eos_id)
                if bool(done.all()):
                    break
            return ys[:, 1:]
        finally:
            self.train(was_training)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    n, t, d = x.shape
    return x.view(n, t, heads, d // heads).transpose(1, 2)  # N x H x T x d_h


class IncrementalDecoder:
    """The decoder of a :class:`TransformerMT` run one token at a time (eval mode).

    Causal self-attention never lets a position see later ones, so the keys and values of
    earlier positions are computed once and kept per layer; each call embeds the newest
    token, attends from it to the kept keys (and to the source memory, whose keys and values
    are projected once) and returns the next-token logits ``N x V``. The result equals the
    last row of :meth:`TransformerMT.decode` on the whole prefix (tested), at the cost of one
    position per step. Written for the model's pre-norm ``nn.TransformerDecoderLayer`` stack.
    """

    def __init__(self, model: TransformerMT, memory: Tensor, src_pad: Tensor):
        self.model = model
        self.layers = list(model.decoder.layers)
        self.keys: list[Tensor | None] = [None] * len(self.layers)
        self.values: list[Tensor | None] = [None] * len(self.layers)
        self.memory_kv = []
        for layer in self.layers:
            attn = layer.multihead_attn
            d = attn.embed_dim
            w, b = attn.in_proj_weight, attn.in_proj_bias
            k = nn.functional.linear(memory, w[d:2 * d], None if b is None else b[d:2 * d])
            v = nn.functional.linear(memory, w[2 * d:], None if b is None else b[2 * d:])
            self.memory_kv.append((_split_heads(k, attn.num_heads), _split_heads(v, attn.num_heads)))
        self.memory_mask = ~src_pad[:, None, None, :]  # N x 1 x 1 x S, True = attend
        self.position = 0

    @staticmethod
    def _attend(attn: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # N x H x 1 x d_h
        n, h, t, dh = out.shape
        return attn.out_proj(out.transpose(1, 2).reshape(n, t, h * dh))

    def __call__(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``N x V`` after feeding ``tokens`` (``N``) at the next position."""
        m = self.model
        if self.position >= m.max_positions:
            raise ConfigError(f"decoding past max_positions {m.max_positions}")
        x = m.embedding(tokens)[:, None] * math.sqrt(m.d_model) + m.positions[self.position]
        for i, layer in enumerate(self.layers):
            sa, d = layer.self_attn, layer.self_attn.embed_dim
            q, k, v = nn.functional.linear(layer.norm1(x), sa.in_proj_weight, sa.in_proj_bias).split(d, dim=-1)
            q, k, v = (_split_heads(t, sa.num_heads) for t in (q, k, v))
            self.keys[i] = k if self.keys[i] is None else torch.cat([self.keys[i], k], dim=2)
            self.values[i] = v if self.values[i] is None else torch.cat([self.values[i], v], dim=2)
            x = x + self._attend(sa, q, self.keys[i], self.values[i], None)
            ca = layer.multihead_attn
            w, b = ca.in_proj_weight, ca.in_proj_bias
            q = nn.functional.linear(layer.norm2(x), w[:ca.embed_dim], None if b is None else b[:ca.embed_dim])
            x = x + self._attend(ca, _split_heads(q, ca.num_heads), *self.memory_kv[i], self.memory_mask)
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        if m.decoder.norm is not None:
            x = m.decoder.norm(x)
        self.position += 1
        return (x @ m.embedding.weight.t() + m.output_bias)[:, 0]


MODELS.register("transformer-mt", TransformerMT)

__all__ = ["TransformerMT", "IncrementalDecoder", "sinusoidal_positions"]
