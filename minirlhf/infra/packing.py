"""Padding-free forwards: each distinct token of a padded batch goes through the weights once (docs/padding-free.md).

A padded (B, T) batch spends every layer's matmuls on pads, and a preference pair spends them twice on the prompt its
sides share. `Packing` lists the batch's N distinct tokens, which run as one (1, N) sequence through embeddings,
projections, MLPs and norms; only attention sees them in the (B, T) grid again, gathered into their cells and masked
as the padded batch is. So every output equals the padded forward's, position by position, and only the arithmetic on
pads and repeated prefixes is gone. The last layer runs only for the tokens whose outputs are read (`used`); the
others' keys and values are all it needs from them. Gathering is autograd's index_select, whose backward sums the
copies: a shared prompt token gets the gradient of both rows that read it.

Distinct tokens are every real cell but those repeating another row's prefix, and of padding only the used cells: a
pad reads token id 0 at the position after the last real token and attends to the real tokens before it and itself,
so one token stands for a whole run of pads (not under a sliding window shorter than the row, where each pad sees
its own window). The idea is the "remove padding" of ByteDance's Effective Transformer (2020) and the unpad/pad
around flash-attention's varlen kernels (Dao et al. 2022); the attention grid keeps it exact on any SDPA backend.

`PaddingFreeCausalLM` and `PaddingFreeRewardModel` are model.py's two models with forwards that do this: they take
and return what the plain models do, so the loops never see it (reward.py and PPO load them while padding_free is on,
the default). Their blocks are `PackedBlock`s: the same modules and weights, called as modules, so that DDP, FSDP2
and gradient checkpointing see each forward as they do the plain model's.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minirlhf.losses import chunked_logprobs
from minirlhf.model import Block, CausalLM, RewardModel, last_non_pad


@dataclass
class Packing:
    """The N distinct tokens of a (B, T) batch. `src[b, t]`: the token in cell (b, t); `dst[i]`: the flattened cell
    whose attention output token i takes; `kept`: the M tokens whose final outputs are read, and `kept_src[b, t]`:
    the one of them in cell (b, t) (any of them for a cell nobody reads). The last layer computes queries for the
    cells `span` alone ((B, K) flattened cells: K columns of each row, from its first kept cell on), and kept token m
    takes the output of span cell `kept_in_span[m]`.

    Every gather is an index_select over rows of (cells or tokens, features): its backward adds rows into place
    (index_add_), where a gather by advanced indexing would scatter element by element (index_put_ with
    accumulate, ~10x slower on CPU)."""

    src: torch.Tensor  # (B, T) int64
    dst: torch.Tensor  # (N,) int64
    kept: torch.Tensor  # (M,) int64, ascending
    kept_src: torch.Tensor  # (B, T) int64, indices into kept
    span: torch.Tensor  # (B, K) int64, flattened cells
    kept_in_span: torch.Tensor  # (M,) int64, indices into span.reshape(-1)

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, T) per-cell values (ids, positions) -> (1, N) per token."""
        return grid.reshape(-1)[self.dst][None]

    def to_grid(self, t: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """(1, heads, N, d) -> (B, heads, T, d): each cell gets its token's query, key or value (cells: (B, K), only
        those)."""
        cells = self.src if cells is None else self.src.reshape(-1)[cells]
        rows = t[0].transpose(0, 1).index_select(0, cells.reshape(-1))  # (B * T, heads, d)
        return rows.view(*cells.shape, *rows.shape[1:]).transpose(1, 2)

    def from_grid(self, y: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, heads, d) attention outputs -> (1, len(tokens), heads * d), each token's from its own cell."""
        return y.reshape(-1, y.shape[2] * y.shape[3]).index_select(0, tokens)[None]

    def span_mask(self, mask: torch.Tensor | None, T: int) -> torch.Tensor:
        """The mask rows (B, 1, K, S) of the span's queries (causal where mask is None: nothing masked)."""
        rows, cols = self.span // T, self.span % T
        if mask is None:
            return (torch.arange(T, device=cols.device) <= cols[..., None])[:, None]
        return mask[rows, :, cols].transpose(1, 2)


def pack(attention_mask: torch.Tensor, used: torch.Tensor | None = None, window: int | None = None,
         pair_prefix_lengths: torch.Tensor | None = None) -> Packing:
    """The Packing of a (B, T) batch with `attention_mask` (1 = real token).

    used: (B, T) bool, the cells whose outputs are read, pads included (None: every real cell).
    window: the model's shortest sliding window (None: none).
    pair_prefix_lengths: (B / 2,) for a reward batch of B / 2 chosen rows, then B / 2 rejected ones, the leading tokens
    each pair's sides share (same tokens, columns and positions): the rejected row's are the chosen row's.
    """
    B, T = attention_mask.shape
    real = attention_mask.bool()
    shared = torch.zeros_like(real)
    if pair_prefix_lengths is not None:
        prefix = torch.cat([torch.zeros_like(pair_prefix_lengths), pair_prefix_lengths])  # (B,)
        shared = real & (torch.arange(T, device=real.device) < prefix[:, None])
    used = real if used is None else used.bool()
    used_pad = ~real & used
    if window is None or T <= window:  # one token per run of used pads
        used_pad = used_pad & ~F.pad(used_pad[:, :-1], (1, 0), value=False)
    is_token = (real & ~shared) | used_pad
    index = is_token.reshape(-1).cumsum(0).view(B, T) - 1
    # any other cell takes the last token before it in its row: for a used pad that is its run's token; the rest
    # (left padding, pads nobody reads) are masked as keys and their outputs dropped, so any token will do
    src = torch.where(is_token, index, -1).cummax(dim=1).values.clamp(min=0)
    if pair_prefix_lengths is not None:
        src = torch.where(shared, src[: B // 2].repeat(2, 1), src)
    dst = is_token.reshape(-1).nonzero().squeeze(1)
    kept = src[used].unique()
    kept_src = torch.searchsorted(kept, src).clamp(max=len(kept) - 1)
    # the last layer's queries: each row's columns from its first kept cell to its last (PPO: the response)
    rows, cols = dst[kept] // T, dst[kept] % T
    first = torch.full((B,), T - 1, device=cols.device).scatter_reduce(0, rows, cols, "amin")
    last = torch.zeros(B, dtype=cols.dtype, device=cols.device).scatter_reduce(0, rows, cols, "amax")
    K = max(int((last - first).max()) + 1, 1)
    span_cols = (first[:, None] + torch.arange(K, device=cols.device)).clamp(max=T - 1)  # (B, K)
    span = torch.arange(B, device=cols.device)[:, None] * T + span_cols
    return Packing(src=src, dst=dst, kept=kept, kept_src=kept_src, span=span,
                   kept_in_span=rows * K + cols - first[rows])


def shared_prefix_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) how many leading tokens each pair's sides share, for a reward batch of B chosen then B rejected rows."""
    chosen, rejected = input_ids.chunk(2)
    real = attention_mask.bool()
    same = (chosen == rejected) & real[: len(chosen)] & real[len(chosen) :]  # (B, T)
    return same.long().cumprod(1).sum(1)


def last_columns(attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, T) bool: the last `keep` columns (all when 0), the cells whose outputs are read (scores_to_keep, targets)."""
    T = attention_mask.shape[1]
    return (torch.arange(T, device=attention_mask.device) >= T - (keep or T)).expand(attention_mask.shape)


# ---------------------------------------------------------------------------------------------------------------------
# The forward over the distinct tokens


class PackedBlock(Block):
    """model.Block whose forward also runs packed: x (1, N, hidden) holds the batch's distinct tokens, and attention
    sees them in the (B, T) grid; in the `last` layer only the kept tokens' queries and outputs are computed."""

    def forward(self, x, cos, sin, mask, cache=None, packing: Packing | None = None, last: bool = False):
        if packing is None:
            return super().forward(x, cos, sin, mask, cache)
        q, k, v = self.attn.project(self.attn_norm(x), cos, sin)  # (1, heads, N, d)
        T = packing.src.shape[1]
        k, v = packing.to_grid(k), packing.to_grid(v)  # (B, heads, T, d)
        if last:  # the last layer: queries of the span's cells only, outputs of the kept tokens only
            q, mask = packing.to_grid(q, packing.span), packing.span_mask(mask, T)  # (B, heads, K, d)
        else:
            q = packing.to_grid(q)
        y = self.attn.attend(q, k, v, mask, is_causal=mask is None).transpose(1, 2)  # (B, T or K, heads, d)
        y = packing.from_grid(y, packing.kept_in_span if last else packing.dst)  # (1, M or N, heads * d)
        a = self.attn_resid_dropout(self.attn.o_proj(y))
        return self.add_mlp(x[0].index_select(0, packing.kept)[None] if last else x, a)


def packed_trunk(transformer: nn.Module, input_ids, attention_mask, position_ids, packing: Packing) -> torch.Tensor:
    """model.Transformer's forward over the distinct tokens of a (B, T) batch: hidden states (1, M, hidden) of the
    kept tokens (packing.kept)."""
    B, T = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
    masks = transformer.attention_masks(attention_mask, B, T)  # the padded batch's, on the grid
    x, cos, sin = transformer.embed_tokens(packing.tokens(input_ids), packing.tokens(position_ids))  # (1, N, hidden)
    for i, (block, window) in enumerate(zip(transformer.blocks, transformer.cfg.sliding_windows, strict=True)):
        last = i == len(transformer.blocks) - 1
        if transformer.gradient_checkpointing and transformer.training and torch.is_grad_enabled():
            x = checkpoint(block, x, cos, sin, masks[window], None, packing, last, use_reentrant=False)
        else:
            x = block(x, cos, sin, masks[window], None, packing, last)
    return transformer.final_norm(x)


def pack_blocks(model: nn.Module) -> None:
    for block in model.transformer.blocks:
        block.__class__ = PackedBlock  # the same module, with the forward above (no weights are made again)


def shortest_window(model: nn.Module) -> int | None:
    return min((w for w in model.cfg.sliding_windows if w is not None), default=None)


def packed_last_columns(model: nn.Module, input_ids, attention_mask, position_ids, keep: int):
    """Final hidden states (M, hidden) of the kept tokens, and (B, keep) which of them is in each of the last `keep`
    cells of every row (all when 0)."""
    packing = pack(attention_mask, last_columns(attention_mask, keep), shortest_window(model))
    h = packed_trunk(model.transformer, input_ids, attention_mask, position_ids, packing)[0]  # (M, hidden)
    return h, packing.kept_src[:, -keep:]


class PaddingFreeCausalLM(CausalLM):
    """CausalLM whose log-probs (forward with targets) compute no pads: the same numbers. Logits (sampling, with a
    KV cache) come from the plain forward."""

    def __init__(self, cfg):
        super().__init__(cfg)
        pack_blocks(self)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep: int = 0,
                targets=None, temperature: float = 1.0, with_entropy: bool = False):
        if targets is None or attention_mask is None:  # logits, or nothing masked: nothing to skip
            return super().forward(input_ids, attention_mask, position_ids, cache, logits_to_keep, targets,
                                   temperature, with_entropy)
        h, cells = packed_last_columns(self, input_ids, attention_mask, position_ids, targets.shape[1] + 1)
        # each distinct (token, target) pair once: the pads after a response share their token and their target
        V = self.cfg.vocab_size
        pairs, cells = (cells[:, :-1] * V + targets).unique(return_inverse=True)
        logprobs, entropy = chunked_logprobs(h.index_select(0, pairs // V), self.head_weight(), pairs % V,
                                             temperature, with_entropy)
        return logprobs[cells], entropy if entropy is None else entropy[cells]  # (B, K) each


class PaddingFreeRewardModel(RewardModel):
    """RewardModel whose forward and token_scores compute no pads: the same scores. `shared_prefix` (set by reward
    training, whose batches hold B chosen then B rejected rows): a pair's common prefix is computed once, while no
    dropout is on (one dropout draw would serve both sides)."""

    shared_prefix = False

    def __init__(self, cfg):
        super().__init__(cfg)
        pack_blocks(self)

    def token_scores(self, input_ids, attention_mask=None, position_ids=None, scores_to_keep: int = 0):
        if attention_mask is None:
            return super().token_scores(input_ids, attention_mask, position_ids, scores_to_keep)
        h, cells = packed_last_columns(self, input_ids, attention_mask, position_ids, scores_to_keep)
        return self.score(h)[cells]  # (B, scores_to_keep, num_labels)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is None or self.cfg.pad_token_id is None:  # (the plain forward says what it lacks)
            return super().forward(input_ids, attention_mask, position_ids)
        pooled = last_non_pad(input_ids, self.cfg.pad_token_id)  # (B,) the cell each row is read at
        dropout = self.training and any(m.p > 0 for m in self.modules() if isinstance(m, nn.Dropout))
        share = self.shared_prefix and not dropout
        packing = pack(attention_mask, F.one_hot(pooled, input_ids.shape[1]), shortest_window(self),
                       shared_prefix_lengths(input_ids, attention_mask) if share else None)
        h = packed_trunk(self.transformer, input_ids, attention_mask, position_ids, packing)[0]  # (M, hidden)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return self.score(h.index_select(0, packing.kept_src[rows, pooled]))  # (B, num_labels)
