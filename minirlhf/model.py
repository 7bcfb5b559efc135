"""One decoder-only transformer for GPT-2, GPT-NeoX (Pythia), Llama, Qwen2, Qwen3 and Mistral.

The families differ in a handful of switches, all fields of `ModelConfig`: learned vs rotary positions (and how much
of each head is rotated), LayerNorm vs RMSNorm, GELU MLP vs SwiGLU, sequential vs parallel residual, biases, grouped
key/value heads, per-head q/k norms, sliding windows, tied embeddings. `hf.py` translates Hugging Face `config.json`
and weight names into this module (`hf.load_pretrained`, `hf.save_pretrained`); nothing here knows Hugging Face
names.

Two heads sit on the shared trunk:
- `CausalLM`: next-token logits (the policy).
- `RewardModel`: a linear `score` per token (the value model uses every position), pooled at the rightmost
  token that is not padding, exactly as transformers' `*ForSequenceClassification` does (e.g.
  `LlamaForSequenceClassification.forward`, via transformers' `GenericForSequenceClassification`).
PPO reads them through `model_inputs` (TRL's `forward` in trl/experimental/ppo/ppo_trainer.py), `get_reward` (TRL's
`get_reward` in trl/experimental/utils.py) and `PolicyAndValue` (TRL's `PolicyAndValueWrapper`).

References: Vaswani et al. 2017 (attention); Radford et al. 2019 (GPT-2); Su et al. 2021 (RoPE); Black et al. 2022
(GPT-NeoX, parallel residual); Touvron et al. 2023 (Llama: RMSNorm, SwiGLU); Ainslie et al. 2023 (GQA).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minirlhf.losses import first_true_indices
from minirlhf.packing import Packing


@dataclass
class ModelConfig:
    model_type: str  # "gpt2", "gpt_neox", "llama", "qwen2", "qwen3" or "mistral"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "rmsnorm"  # "layernorm" (with bias) or "rmsnorm"
    norm_eps: float = 1e-6
    positions: str = "rope"  # "rope" or "learned"
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # leading dims of each head that are rotated (NeoX rotates only a fraction)
    rope_scaling: dict | None = None  # Llama 3.1 frequency scaling: factor, low/high_freq_factor, original length
    mlp: str = "swiglu"  # "swiglu" (gate * up) or "plain" (up -> act -> down)
    hidden_act: str = "silu"
    parallel_residual: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    sliding_windows: list = field(default_factory=list)  # per layer: None, or attend to the last N keys only
    attn_scale_by_layer: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx
    tie_word_embeddings: bool = False
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    num_labels: int = 1
    hf_config: dict = field(default_factory=dict)  # the config.json this came from, written back by save_pretrained


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Zhang & Sennrich 2019; transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layernorm" else RMSNorm(dim, cfg.norm_eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of RoPE (Su et al. 2021), with Llama 3.1's smooth rescaling if configured."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head; the rest pass through (partial rotary, GPT-NeoX)."""
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin  # "rotate_half" layout, as in HF checkpoints
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated  # full rotary needs no copy


class KVCache:
    """Preallocated keys and values of every layer, (B, kv_heads, max_len, head_dim), filled left to right."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0  # positions already written


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attn_dropout = nn.Dropout(cfg.attn_dropout)  # holds p for SDPA, so disable_dropout reaches it
        self.scale = cfg.head_dim**-0.5 / ((layer_idx + 1) if cfg.attn_scale_by_layer else 1)
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, mask, cache: KVCache | None, packing: Packing | None = None, last: bool = False):
        B, T, _ = x.shape  # packed: B = 1 and T = the number of distinct tokens
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if packing is not None:  # attention sees the tokens in the padded grid, masked as the padded batch
            q, k, v = packing.to_grid(q), packing.to_grid(k), packing.to_grid(v)
            if last:  # the last layer: queries of the kept tokens only
                q, k, v, mask = packing.kept_queries(q, k, v, mask)
        if cache is not None:
            start = cache.length
            cache.k[self.layer_idx][:, :, start : start + T] = k
            cache.v[self.layer_idx][:, :, start : start + T] = v
            k, v = cache.k[self.layer_idx][:, :, : start + T], cache.v[self.layer_idx][:, :, : start + T]
        # CPU autocast: torch's CPU flash attention is ~6x slower in bf16 than in fp32 (backward) and reads a
        # cache kept in the weights' dtype, so attention runs in fp32 there; the projections stay in bf16.
        cpu_autocast = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if cpu_autocast else nullcontext():
            y = F.scaled_dot_product_attention(
                *((t.float() for t in (q, k, v)) if cpu_autocast else (q, k, v)),
                attn_mask=mask,
                is_causal=mask is None and cache is None,
                dropout_p=self.attn_dropout.p if self.training else 0.0,
                scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # (B, heads, T, head_dim)
        y = y.transpose(1, 2)
        if packing is not None:
            y = y.reshape(1, -1, *y.shape[2:]) if last else packing.from_grid(y)  # (1, M or N, heads, d)
        return self.o_proj(y.flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        swiglu = cfg.mlp == "swiglu"
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias) if swiglu else None
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (Shazeer 2020)


class Block(nn.Module):
    """One transformer layer, pre-norm, in either residual layout.

    sequential (GPT-2, Llama):  h = x + attn(norm1(x));   out = h + mlp(norm2(h))
    parallel (GPT-NeoX):        out = x + attn(norm1(x)) + mlp(norm2(x))
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.attn_resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.mlp_resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.parallel_residual = cfg.parallel_residual

    def forward(self, x, cos, sin, mask, cache=None, packing=None, last=False):
        a = self.attn_resid_dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache, packing, last))
        if last:  # packed, last layer: only the kept tokens go on
            x = x[:, packing.kept]
        if self.parallel_residual:
            return x + a + self.mlp_resid_dropout(self.mlp(self.mlp_norm(x)))
        h = x + a
        return h + self.mlp_resid_dropout(self.mlp(self.mlp_norm(h)))


def attention_mask_4d(attention_mask, T: int, start: int, window: int | None) -> torch.Tensor:
    """(B, S) key mask of 1/0 -> (B, 1, T, S) boolean "may attend" for queries at positions start..start+T-1.

    Causal, padding-aware and optionally sliding-window (a key is visible while query - key < window). Every
    query may always see itself, so a left-pad query row is never fully masked (SDPA would return NaN there);
    what such rows compute is never used.
    """
    S = attention_mask.shape[1]
    q_pos = torch.arange(start, start + T, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    visible = k_pos <= q_pos
    if window is not None:
        visible = visible & (q_pos - k_pos < window)
    mask = visible[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    return (mask | (k_pos == q_pos)[None])[:, None]


class Transformer(nn.Module):
    """Embeddings, blocks and the final norm: input ids (B, T) -> hidden states (B, T, hidden_size); with a Packing
    (packing.py), hidden states (1, M, hidden_size) of the batch's kept tokens (packing.kept)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        learned = cfg.positions == "learned"
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if learned else None
        self.embd_dropout = nn.Dropout(cfg.embd_dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = make_norm(cfg, cfg.hidden_size)
        if cfg.positions == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                packing: Packing | None = None):
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        masks = {}  # one 4-D mask per distinct window; None means plain causal attention
        for window in set(self.cfg.sliding_windows):
            needs_mask = attention_mask is not None and not bool(attention_mask.all())
            needs_mask = needs_mask or (window is not None and start + T > window) or cache is not None
            if needs_mask:
                key_mask = attention_mask if attention_mask is not None else input_ids.new_ones(B, start + T)
                masks[window] = attention_mask_4d(key_mask, T, start, window)
            else:
                masks[window] = None
        if packing is not None:
            input_ids, position_ids = packing.tokens(input_ids), packing.tokens(position_ids)
        x = self.embed(input_ids)
        cos = sin = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        else:
            freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, rotary_dim / 2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, rotary_dim), broadcast over heads
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x = self.embd_dropout(x)
        for i, (block, window) in enumerate(zip(self.blocks, self.cfg.sliding_windows, strict=True)):
            last = packing is not None and i == len(self.blocks) - 1
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the block in backward instead of storing its activations.
                x = checkpoint(block, x, cos, sin, masks[window], None, packing, last, use_reentrant=False)
            else:
                x = block(x, cos, sin, masks[window], cache, packing, last)
        if cache is not None:
            cache.length += T
        return self.final_norm(x)


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Fresh random weights as transformers initialises them: N(0, initializer_range), zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def disable_dropout(model: nn.Module) -> None:
    """Set p = 0 on every dropout, attention dropout included (TRL's disable_dropout_in_model, trl/trainer/utils.py)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class CausalLM(nn.Module):
    """The trunk plus a language-model head: (B, T) ids -> (B, T, vocab) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                logits_to_keep: int = 0, packing: Packing | None = None):
        """Logits (B, logits_to_keep, vocab) of the last `logits_to_keep` positions (all when 0), as transformers'
        argument of that name: the vocabulary projection is the largest matmul of a small model, and PPO needs it on
        the response only. With a Packing, each distinct token is projected once."""
        h = self.transformer(input_ids, attention_mask, position_ids, cache, packing)
        weight = self.transformer.embed.weight if self.lm_head is None else self.lm_head.weight
        if packing is None:
            return F.linear(h[:, -logits_to_keep:], weight)
        tokens, cells = packing.kept_src[:, -logits_to_keep:].unique(return_inverse=True)
        return F.linear(h[0, tokens], weight)[cells]


class RewardModel(nn.Module):
    """The trunk plus a linear `score` head without bias (sequence classification, num_labels outputs).

    `forward` pools at the rightmost non-pad token (pool_last_non_pad); `token_scores` keeps every position, which is
    what PPO's value model needs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)

    def token_scores(self, input_ids, attention_mask=None, position_ids=None, packing: Packing | None = None):
        scores = self.score(self.transformer(input_ids, attention_mask, position_ids, packing=packing))
        return scores if packing is None else scores[0][packing.kept_src]  # (B, T, num_labels), kept cells only

    def forward(self, input_ids, attention_mask=None, position_ids=None, packing: Packing | None = None):
        scores = self.token_scores(input_ids, attention_mask, position_ids, packing)
        return pool_last_non_pad(scores, input_ids, self.cfg.pad_token_id)  # (B, num_labels)


def pool_last_non_pad(scores: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """scores (B, T, C) -> (B, C) at the rightmost token != pad_token_id; position 0 for an all-pad row.

    The attention mask is deliberately not used, as in transformers: with pad == eos the trailing EOS counts as
    padding and the last text token is pooled.
    """
    if pad_token_id is None and len(input_ids) > 1:
        raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
    return scores[torch.arange(len(input_ids), device=input_ids.device), last_non_pad(input_ids, pad_token_id)]


def last_non_pad(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) column of the rightmost token != pad_token_id (0 for an all-pad row; the last column without a pad id)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        return torch.full((B,), T - 1, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).int()
    return (torch.arange(T, device=input_ids.device) * non_pad).argmax(-1)


# ---------------------------------------------------------------------------------------------------------------------
# PPO's view of the models: left-padded query + response rows in, per-token outputs out


def model_inputs(query_responses: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) as TRL's forward() builds them: pads are masked out and read as id 0
    (so a pad id outside the embedding works), positions count from each row's first real token."""
    attention_mask = query_responses != pad_token_id  # (B, T)
    position_ids = attention_mask.cumsum(1) - attention_mask.long()  # (B, T)
    return query_responses.masked_fill(~attention_mask, 0), attention_mask, position_ids


def gather_index(responses: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Response ids to gather logprobs at. A pad id may lie outside the vocabulary ([PAD] added without resizing), so
    pads read id 0; callers overwrite those positions with INVALID_LOGPROB."""
    return responses.masked_fill(responses == pad_token_id, 0)


def get_reward(model: RewardModel, query_responses: torch.Tensor, pad_token_id: int, context_length: int,
               packing: Packing | None = None):
    """Per-token scores (B, T, 1), the score (B,) at the last token before the first pad of the response part, and
    that index (B,); the prompt's left padding is ignored, an empty response is scored at its prompt's last token."""
    reward_logits = model.token_scores(*model_inputs(query_responses, pad_token_id), packing=packing)  # (B, T, 1)
    sequence_lengths = first_true_indices(query_responses[:, context_length:] == pad_token_id) - 1 + context_length
    rows = torch.arange(len(reward_logits), device=reward_logits.device)
    return reward_logits, reward_logits[rows, sequence_lengths].squeeze(-1), sequence_lengths


class PolicyAndValue(nn.Module):
    """The policy and the value model as one module, so one optimizer and one DDP wrapper cover both (TRL's
    PolicyAndValueWrapper): (B, T) inputs -> logits (B, logits_to_keep, vocab) of the last positions (all when 0)
    and values (B, T) at every position."""

    def __init__(self, policy: CausalLM, value_model: RewardModel | None):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0, packing: Packing | None = None):
        values = None  # critic-free estimators have no value model
        if self.value_model is not None:
            values = self.value_model.token_scores(input_ids, attention_mask, position_ids, packing).squeeze(-1)
        policy = self.policy(input_ids, attention_mask, position_ids, logits_to_keep=logits_to_keep, packing=packing)
        return policy, values
