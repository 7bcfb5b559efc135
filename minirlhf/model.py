"""One decoder-only transformer for GPT-2, GPT-NeoX (Pythia), Llama, Qwen2, Qwen3 and Mistral.

The families differ in a handful of switches, all fields of `ModelConfig`: learned vs rotary positions (and how much
of each head is rotated), LayerNorm vs RMSNorm, GELU MLP vs SwiGLU, sequential vs parallel residual, biases, grouped
key/value heads, per-head q/k norms, sliding windows, tied embeddings. `hf.py` translates Hugging Face `config.json`
and weight names into this module (`hf.load_pretrained`, `hf.save_pretrained`); nothing here knows Hugging Face
names.

Two heads sit on the shared trunk:
- `CausalLM`: next-token logits, or the log-probs of given next tokens (the policy).
- `RewardModel`: a linear `score` per token (the value model uses every position), pooled at the rightmost
  token that is not padding, exactly as transformers' `*ForSequenceClassification` does (e.g.
  `LlamaForSequenceClassification.forward`, via transformers' `GenericForSequenceClassification`).
PPO reads them through `model_inputs` (TRL's `forward` in trl/experimental/ppo/ppo_trainer.py), `get_reward` (TRL's
`get_reward` in trl/experimental/utils.py) and `PolicyAndValue` (TRL's `PolicyAndValueWrapper`).

References: Vaswani et al. 2017 (attention); Radford et al. 2019 (GPT-2); Su et al. 2021 (RoPE); Black et al. 2022
(GPT-NeoX, parallel residual); Touvron et al. 2023 (Llama: RMSNorm, SwiGLU); Ainslie et al. 2023 (GQA).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minirlhf.losses import chunked_logprobs, first_true_indices


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


tanh_gelu = lambda x: F.gelu(x, approximate="tanh")  # GPT-2's approximation, under three Hugging Face names
ACTIVATIONS = {"gelu": F.gelu, "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu, "gelu_fast": tanh_gelu,
               "relu": F.relu, "silu": F.silu, "swish": F.silu}


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
    if (rot := cos.shape[-1]) < x.shape[-1]:  # full rotary skips the slices: their backward fills zeros and copies
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # "rotate_half" layout, as in HF checkpoints


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

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        q, k, v = self.project(x, cos, sin)  # (B, heads, T, head_dim); k, v: (B, kv_heads, T, head_dim)
        if cache is not None:  # sampling: keys and values of the earlier positions come from the cache
            start, T = cache.length, x.shape[1]
            cache.k[self.layer_idx][:, :, start : start + T] = k
            cache.v[self.layer_idx][:, :, start : start + T] = v
            k, v = cache.k[self.layer_idx][:, :, : start + T], cache.v[self.layer_idx][:, :, : start + T]
        y = self.attend(q, k, v, mask, is_causal=mask is None and cache is None)  # (B, heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def project(self, x, cos, sin):
        """Queries, keys and values of x (B, T, hidden), per head, rotated where the model uses RoPE."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, mask, is_causal: bool):
        """softmax(q k^T * scale + mask) v (Vaswani et al. 2017), each group of query heads sharing one key/value head
        (GQA); mask: (B, 1, T, S) boolean "may attend", or None with is_causal."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=self.attn_dropout.p if self.training else 0.0,
                                              scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads)


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

    def forward(self, x, cos, sin, mask, cache=None):
        a = self.attn_resid_dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return self.add_mlp(x, a)

    def add_mlp(self, x, a):
        """The rest of the layer once attention has given `a` for the input `x`."""
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
    """Embeddings, blocks and the final norm: input ids (B, T) -> hidden states (B, T, hidden_size)."""

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

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        masks = self.attention_masks(attention_mask, B, T, start, cache is not None)
        x, cos, sin = self.embed_tokens(input_ids, position_ids)
        for block, window in zip(self.blocks, self.cfg.sliding_windows, strict=True):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the block in backward instead of storing its activations.
                x = checkpoint(block, x, cos, sin, masks[window], use_reentrant=False)
            else:
                x = block(x, cos, sin, masks[window], cache)
        if cache is not None:
            cache.length += T
        return self.final_norm(x)

    def embed_tokens(self, input_ids, position_ids):
        """Token (plus learned position) embeddings, and RoPE's cos and sin (None with learned positions)."""
        x = self.embed(input_ids)
        cos = sin = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        else:
            freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, rotary_dim / 2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, rotary_dim), broadcast over heads
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return self.embd_dropout(x), cos, sin

    def attention_masks(self, attention_mask, B: int, T: int, start: int = 0, cached: bool = False) -> dict:
        """One 4-D mask per distinct sliding window (None: no window); a mask of None means plain causal attention."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=self.embed.weight.device)
        return {window: attention_mask_4d(attention_mask, T, start, window)
                if padded or cached or (window is not None and start + T > window) else None
                for window in set(self.cfg.sliding_windows)}


def disable_dropout(model: nn.Module) -> None:
    """Set p = 0 on every dropout, attention dropout included (TRL's disable_dropout_in_model, trl/trainer/utils.py)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class CausalLM(nn.Module):
    """The trunk plus a language-model head: (B, T) ids -> (B, T, vocab) logits, or the log-probs of given tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                logits_to_keep: int = 0, targets=None, temperature: float = 1.0, with_entropy: bool = False):
        """Logits (B, logits_to_keep, vocab) of the last `logits_to_keep` positions (all when 0; transformers'
        argument); given `targets` (B, K), the ids of the last K tokens, their log-probs and entropies (B, K; None
        unless with_entropy) under softmax(logits / temperature) instead, without the logits (chunked_logprobs)."""
        keep = logits_to_keep if targets is None else targets.shape[1] + 1
        h = self.transformer(input_ids, attention_mask, position_ids, cache)[:, -keep:]
        if targets is None:
            return F.linear(h, self.head_weight())
        return chunked_logprobs(h[:, :-1], self.head_weight(), targets, temperature, with_entropy)

    def head_weight(self) -> torch.Tensor:
        """The (vocab, hidden_size) projection onto the vocabulary: lm_head's, or the embedding matrix when tied."""
        return self.transformer.embed.weight if self.lm_head is None else self.lm_head.weight


class RewardModel(nn.Module):
    """The trunk plus a linear `score` head without bias (num_labels outputs): per-token scores (`token_scores`, what
    PPO's value model needs), pooled at the rightmost non-pad token by `forward` (sequence classification)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)

    def token_scores(self, input_ids, attention_mask=None, position_ids=None, scores_to_keep: int = 0):
        """Scores (B, scores_to_keep, num_labels) of the last `scores_to_keep` positions (all when 0)."""
        return self.score(self.transformer(input_ids, attention_mask, position_ids)[:, -scores_to_keep:])

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        scores = self.token_scores(input_ids, attention_mask, position_ids)
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


def get_reward(model: RewardModel, query_responses: torch.Tensor, pad_token_id: int, context_length: int):
    """Per-token scores (B, T + 1, 1) of the positions from the last query token on (TRL returns every position; PPO
    reads only these), the score (B,) at the last token before the first pad of the response part, and that index
    (B,) into query_responses; the prompt's left padding is ignored, an empty response is scored at its prompt's last
    token."""
    T = query_responses.shape[1] - context_length
    reward_logits = model.token_scores(*model_inputs(query_responses, pad_token_id), scores_to_keep=T + 1)
    sequence_lengths = first_true_indices(query_responses[:, context_length:] == pad_token_id) - 1 + context_length
    rows = torch.arange(len(reward_logits), device=reward_logits.device)
    score = reward_logits[rows, sequence_lengths - (context_length - 1)].squeeze(-1)
    return reward_logits, score, sequence_lengths


class PolicyAndValue(nn.Module):
    """The policy and the value model as one module, so one optimizer and one DDP wrapper cover both (TRL's
    PolicyAndValueWrapper): (B, T) inputs ending in the (B, K) response ids `targets` -> the policy's log-probs of
    them and entropies at `temperature` (CausalLM.forward) and the values, each (B, K), where they are predicted."""

    def __init__(self, policy: CausalLM, value_model: RewardModel | None):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids, attention_mask, position_ids, targets: torch.Tensor, temperature: float = 1.0):
        values = None  # critic-free estimators have no value model
        if self.value_model is not None:
            keep = targets.shape[1] + 1
            values = self.value_model.token_scores(input_ids, attention_mask, position_ids, keep)[:, :-1].squeeze(-1)
        logprobs, entropy = self.policy(input_ids, attention_mask, position_ids, targets=targets,
                                        temperature=temperature, with_entropy=True)
        return logprobs, entropy, values
