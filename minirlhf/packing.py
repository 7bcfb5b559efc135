"""Padding-free forwards: each distinct token of a padded batch goes through the weights once.

A padded (B, T) batch spends the matmuls of every layer on pads, and a preference pair spends them twice on the
prompt its chosen and rejected sides share. `Packing` lists the batch's distinct tokens: N of them run as one
(1, N) sequence through embeddings, projections, MLPs and norms. Only attention sees them in the (B, T) grid again,
gathered into their cells and masked exactly as the padded batch is; each token's output is read back from one cell.
So every output equals the padded forward's, position by position (the grid's attention is the same computation),
and only the arithmetic on pads and on repeated prefixes is gone. The last layer runs only for the tokens whose
outputs are read (`used`: a reward model reads one cell per row, PPO the response): the others' keys and values are
all it needs from them. Gathering is autograd's index_select, whose backward sums the copies: a shared prompt
token's keys and values get the gradient of both rows that read them.

Which cells are distinct tokens:
- every real cell (attention mask 1), except one that repeats the same column of another row (a shared prefix);
- of padding, only cells whose outputs are used (`used`): a padded position reads token id 0 at the position
  after the last real token and attends to the real tokens before it and to itself, so every pad of a run (e.g. all
  pads after a response's stop token) computes the same output, and one token per run stands for all of them. Not
  under a sliding window shorter than the row: each pad then sees the keys of its own window, so each is a token.

The idea is the "remove padding" of ByteDance's Effective Transformer (2020) and the unpad/pad around
flash-attention's varlen kernels (Dao et al. 2022); here the attention grid keeps it exact on any SDPA backend.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Packing:
    """The N distinct tokens of a (B, T) batch. `src[b, t]`: the token in cell (b, t); `dst[i]`: the flattened cell
    whose attention output token i takes; `kept`: the M tokens whose final outputs are read, and `kept_src[b, t]`:
    the one of them in cell (b, t) (any of them for a cell nobody reads)."""

    src: torch.Tensor  # (B, T) int64
    dst: torch.Tensor  # (N,) int64
    kept: torch.Tensor  # (M,) int64, ascending
    kept_src: torch.Tensor  # (B, T) int64, indices into kept

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, T) per-cell values (ids, positions) -> (1, N) per token."""
        return grid.reshape(-1)[self.dst][None]

    def to_grid(self, t: torch.Tensor) -> torch.Tensor:
        """(1, heads, N, d) -> (B, heads, T, d): each cell gets its token's query, key or value."""
        B, T = self.src.shape
        return t[0][:, self.src.reshape(-1)].view(t.shape[1], B, T, t.shape[-1]).transpose(0, 1)

    def from_grid(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, heads, d) attention outputs -> (1, N, heads, d), each token's from its own cell."""
        return y.reshape(-1, *y.shape[2:])[self.dst][None]

    def kept_queries(self, q, k, v, mask):
        """Attention of the last layer, for the kept tokens alone: (B, heads, T, d) grids -> each kept token's query
        (M, heads, 1, d) beside its row's keys and values (M, heads, T, d) and mask row (M, 1, 1, T)."""
        B, T = self.src.shape
        rows, cols = self.dst[self.kept] // T, self.dst[self.kept] % T
        if mask is None:  # causal, nothing masked
            mask = (torch.arange(T, device=cols.device) <= cols[:, None])[:, None, None]
        else:
            mask = mask[rows, :, cols][:, :, None]
        return q[rows, :, cols][:, :, None], k[rows], v[rows], mask


def pack(attention_mask: torch.Tensor, used: torch.Tensor | None = None, window: int | None = None,
         shared_from: torch.Tensor | None = None, shared_length: torch.Tensor | None = None) -> Packing:
    """The Packing of a (B, T) batch with `attention_mask` (1 = real token).

    used: (B, T) bool, the cells whose outputs are read, pads included (None: every real cell).
    window: the model's shortest sliding window (None: none).
    shared_from, shared_length: (B,) row r's first shared_length[r] cells hold the same tokens, at the same columns
    and positions, as row shared_from[r] (which shares nothing itself), e.g. a rejected side's prompt.
    """
    B, T = attention_mask.shape
    real = attention_mask.bool()
    cols = torch.arange(T, device=real.device)
    shared = torch.zeros_like(real)
    if shared_length is not None:
        shared = real & (cols < shared_length[:, None])
    used = real if used is None else used.bool()
    used_pad = ~real & used
    if window is None or T <= window:  # one token per run of used pads
        used_pad = used_pad & ~F.pad(used_pad[:, :-1], (1, 0), value=False)
    is_token = (real & ~shared) | used_pad
    index = is_token.reshape(-1).cumsum(0).view(B, T) - 1
    # any other cell takes the last token before it in its row: for a used pad that is its run's token; the rest
    # (left padding, pads nobody reads) are masked as keys and their outputs dropped, so any token will do
    src = torch.where(is_token, index, -1).cummax(dim=1).values.clamp(min=0)
    if shared_length is not None:
        src = torch.where(shared, src[shared_from], src)
    kept = src[used].unique()
    kept_src = torch.searchsorted(kept, src).clamp(max=len(kept) - 1)
    return Packing(src=src, dst=is_token.reshape(-1).nonzero().squeeze(1), kept=kept, kept_src=kept_src)


def pair_packing(attention_mask: torch.Tensor, pooled: torch.Tensor, prefix_lengths: torch.Tensor | None) -> Packing:
    """Packing of a reward batch, B chosen rows then B rejected rows, read at the (2B,) `pooled` columns;
    prefix_lengths (B,): the tokens each pair's sides share from the start (None: share nothing), computed once,
    in the chosen row."""
    used = F.one_hot(pooled, attention_mask.shape[1]).bool()  # (2B, T)
    if prefix_lengths is None:
        return pack(attention_mask, used)
    rows = torch.arange(len(prefix_lengths), device=attention_mask.device)
    return pack(attention_mask, used, shared_from=torch.cat([rows, rows]),
                shared_length=torch.cat([torch.zeros_like(prefix_lengths), prefix_lengths]))


def rollout_packing(query_responses: torch.Tensor, pad_token_id: int, context_length: int, *models) -> Packing:
    """Packing of PPO's left-padded query + response rows for `models`, whose outputs are read from the last query
    token on."""
    windows = [w for model in models if model is not None for w in model.cfg.sliding_windows if w is not None]
    used = (torch.arange(query_responses.shape[1], device=query_responses.device) >= context_length - 1).expand(
        query_responses.shape)
    return pack(query_responses != pad_token_id, used, window=min(windows, default=None))


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading token ids two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
