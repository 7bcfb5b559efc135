"""Padding-free forwards: each distinct token of a padded batch goes through the weights once (docs/padding-free.md).

A padded (B, T) batch spends every layer's matmuls on pads, and a preference pair spends them twice on the prompt its
sides share. `Packing` lists the batch's N distinct tokens, which run as one (1, N) sequence through embeddings,
projections, MLPs and norms; only attention sees rows again, one row at a time: each row's tokens ask its own cells
(keys and values gathered into them, from its first real cell on), masked as the padded batch is. So every output
equals the padded forward's, position by position, and only the arithmetic on pads and repeated prefixes is gone,
left padding in attention too. The last layer runs only for the tokens whose outputs are read (`used`); the others'
keys and values are all it needs from them. Every gather is an index_select over rows of (tokens, features), whose
backward adds rows into place (index_add_), summing the copies: a shared prompt token gets the gradient of both rows
that read it. (A gather by advanced indexing would scatter back element by element, index_put_ with accumulate,
~10x slower on CPU.)

Distinct tokens are every real cell but those repeating another row's prefix, and of padding only the used cells: a
pad reads token id 0 at the position after the last real token and attends to the real tokens before it and itself,
so one token stands for a whole run of pads (not under a sliding window shorter than the row, where each pad sees
its own window). The idea is the "remove padding" of ByteDance's Effective Transformer (2020) and the unpad/pad
around flash-attention's varlen kernels (Dao et al. 2022); a loop over rows with the padded batch's masks keeps it
exact on any SDPA backend.

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
    """The N distinct tokens of a (B, T) batch, in row-major order of their cells. `src[b, t]`: the token in cell
    (b, t); `dst[i]`: the flattened cell whose attention output token i takes; `kept`: the M tokens whose final
    outputs are read, and `kept_src[b, t]`: the one of them in cell (b, t) (any of them for a cell nobody reads).
    `rows[b]`: row b's tokens [start, end) and kept tokens [start, end), and the columns [start, end) of its cells that
    its queries may see (from its first real or used cell to its last token's)."""

    src: torch.Tensor  # (B, T) int64
    dst: torch.Tensor  # (N,) int64
    kept: torch.Tensor  # (M,) int64, ascending
    kept_src: torch.Tensor  # (B, T) int64, indices into kept
    rows: list[tuple[int, int, int, int, int, int]]

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, T) per-cell values (ids, positions) -> (1, N) per token."""
        return grid.reshape(-1)[self.dst][None]

    def row_attention_inputs(self, mask: torch.Tensor | None, last: bool) -> tuple:
        """What attention needs per row, the same in every layer (so made once per forward and window): how many
        queries each row has (its tokens, or where `last` its kept tokens, in order), the token in each cell its
        queries may see (all rows' cells in one tensor) and how many those are, and the rows' masks (1, 1, queries,
        cells) from the padded batch's (None: plain causal)."""
        T = self.src.shape[1]
        query_counts, keys, key_counts, masks = [], [], [], []
        for b, (start, end, kept_start, kept_end, first, stop) in enumerate(self.rows):
            queries = self.kept[kept_start:kept_end] if last else torch.arange(start, end, device=self.src.device)
            q_cols = self.dst[queries] % T
            if mask is None:
                row_mask = torch.arange(first, stop, device=q_cols.device) <= q_cols[:, None]
            else:
                row_mask = mask[b, 0, q_cols, first:stop]
            query_counts.append(len(queries))
            keys.append(self.src[b, first:stop])
            key_counts.append(stop - first)
            causal = row_mask.shape[0] == row_mask.shape[1] and torch.equal(row_mask, torch.ones_like(row_mask).tril())
            masks.append(None if causal else row_mask[None, None])  # None: SDPA skips the blocks above the diagonal
        return query_counts, torch.cat(keys), key_counts, masks

    def attention(self, attn: nn.Module, q, k, v, rows: tuple, last: bool) -> torch.Tensor:
        """Attention row by row: each row's queries (its tokens) over its own cells from its first real one (no left
        padding), masked as in the padded batch (`rows`: row_attention_inputs): (1, heads, N, d) queries, keys,
        values -> outputs (1, N, heads * d), or (1, M, heads * d) for the kept tokens' queries where `last`. One
        gather and one split each (whose backward is one cat), not one per row: a per-row slice's backward would
        make a zero tensor of all N tokens for every row."""
        query_counts, keys, key_counts, masks = rows
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (N, heads, d): rows of tokens, for index_select
        q = (q.index_select(0, self.kept) if last else q).split(query_counts)
        k, v = (t.index_select(0, keys).split(key_counts) for t in (k, v))
        outputs = [attn.attend(q_b.transpose(0, 1)[None], k_b.transpose(0, 1)[None], v_b.transpose(0, 1)[None],
                               mask_b, is_causal=mask_b is None)[0].transpose(0, 1).flatten(1)  # (queries, heads * d)
                   for q_b, k_b, v_b, mask_b in zip(q, k, v, masks, strict=True) if len(q_b)]
        return torch.cat(outputs)[None]


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
    # per row: its tokens and kept tokens (ranges: both lists are in row-major order), and the cells its queries may
    # see, from its first real or used cell (none before it: left padding) to its last token's
    token_ends = torch.bincount(dst // T, minlength=B).cumsum(0).tolist()
    kept_ends = torch.bincount(dst[kept] // T, minlength=B).cumsum(0).tolist()
    first = torch.where(real | used, torch.arange(T, device=real.device), T).amin(1).tolist()
    stop = torch.zeros(B, dtype=torch.long, device=real.device).scatter_reduce(0, dst // T, dst % T + 1, "amax")
    ranges = zip([0, *token_ends[:-1]], token_ends, [0, *kept_ends[:-1]], kept_ends, first, stop.tolist(), strict=True)
    rows = [(start, end, kept_start, kept_end, f, max(f, s)) for start, end, kept_start, kept_end, f, s in ranges]
    return Packing(src=src, dst=dst, kept=kept, kept_src=kept_src, rows=rows)


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
    """model.Block whose forward also runs packed: x (1, N, hidden) holds the batch's distinct tokens, attention sees
    them row by row (`mask` is then Packing.row_attention_inputs'), and in the `last` layer only the kept tokens'
    queries and outputs are computed."""

    def forward(self, x, cos, sin, mask, cache=None, packing: Packing | None = None, last: bool = False):
        if packing is None:
            return super().forward(x, cos, sin, mask, cache)
        q, k, v = self.attn.project(self.attn_norm(x), cos, sin)  # (1, heads, N, d)
        y = packing.attention(self.attn, q, k, v, mask, last)  # (1, M or N, heads * d)
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
    rows = {}  # each window's per-row attention inputs, made once for all the layers (and once more for the last)
    for i, (block, window) in enumerate(zip(transformer.blocks, transformer.cfg.sliding_windows, strict=True)):
        last = i == len(transformer.blocks) - 1
        if (window, last) not in rows:
            rows[window, last] = packing.row_attention_inputs(masks[window], last)
        if transformer.gradient_checkpointing and transformer.training and torch.is_grad_enabled():
            x = checkpoint(block, x, cos, sin, rows[window, last], None, packing, last, use_reentrant=False)
        else:
            x = block(x, cos, sin, rows[window, last], None, packing, last)
    return transformer.final_norm(x)


def pack_blocks(model: nn.Module) -> None:
    for block in model.transformer.blocks:
        block.__class__ = PackedBlock  # the same module, with the forward above (no weights are made again)


def shortest_window(model: nn.Module) -> int | None:
    return min((w for w in model.cfg.sliding_windows if w is not None), default=None)


PACK_WHEN_SAVING = 0.1
"""Pack only where at least this share of a batch's cells holds no distinct token (padding, runs of pads, shared
prefixes); else the twins run the plain forward. With little padding the row-by-row attention and the gathers cost
more than they save: bench_ppo's toy set (8% padding) ran at 0.92x of the padded forward's speed at two threads."""


def pays(packing: Packing, cells: int) -> bool:
    """Whether packing skips at least PACK_WHEN_SAVING of the `cells` of the padded batch."""
    return len(packing.dst) <= (1 - PACK_WHEN_SAVING) * cells


def packed_last_columns(model: nn.Module, input_ids, attention_mask, position_ids, keep: int):
    """Final hidden states (M, hidden) of the kept tokens, and (B, keep) which of them is in each of the last `keep`
    cells of every row (all when 0); None where packing does not pay."""
    packing = pack(attention_mask, last_columns(attention_mask, keep), shortest_window(model))
    if not pays(packing, input_ids.numel()):
        return None
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
        packed = None  # logits (sampling, with a cache), or nothing masked: nothing to skip
        if targets is not None and attention_mask is not None:
            packed = packed_last_columns(self, input_ids, attention_mask, position_ids, targets.shape[1] + 1)
        if packed is None:  # (or too little padding to pay)
            return super().forward(input_ids, attention_mask, position_ids, cache, logits_to_keep, targets,
                                   temperature, with_entropy)
        h, cells = packed
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
        packed = None
        if attention_mask is not None:
            packed = packed_last_columns(self, input_ids, attention_mask, position_ids, scores_to_keep)
        if packed is None:  # nothing masked, or too little padding to pay
            return super().token_scores(input_ids, attention_mask, position_ids, scores_to_keep)
        h, cells = packed
        return self.score(h)[cells]  # (B, scores_to_keep, num_labels)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is None or self.cfg.pad_token_id is None:  # (the plain forward says what it lacks)
            return super().forward(input_ids, attention_mask, position_ids)
        pooled = last_non_pad(input_ids, self.cfg.pad_token_id)  # (B,) the cell each row is read at
        dropout = self.training and any(m.p > 0 for m in self.modules() if isinstance(m, nn.Dropout))
        share = self.shared_prefix and not dropout
        packing = pack(attention_mask, F.one_hot(pooled, input_ids.shape[1]), shortest_window(self),
                       shared_prefix_lengths(input_ids, attention_mask) if share else None)
        if not pays(packing, input_ids.numel()):
            return super().forward(input_ids, attention_mask, position_ids)
        h = packed_trunk(self.transformer, input_ids, attention_mask, position_ids, packing)[0]  # (M, hidden)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return self.score(h.index_select(0, packing.kept_src[rows, pooled]))  # (B, num_labels)
