"""Every RLHF formula of the reward-model and PPO loops, as small pure tensor functions (torch only).

Log-probabilities and entropies of target tokens straight from the hidden states and the lm_head, a chunk of tokens
at a time (`chunked_logprobs`): what the policy's log-probs in PPO and SFT's loss are computed with.
SFT: the completion-only cross-entropy (transformers loss_utils.py, ForCausalLMLoss).
Reward model: the Bradley-Terry loss with TRL's optional margin and centring term, and the logged metrics
(trl/trainer/reward_trainer.py, `RewardTrainer.compute_loss`).
PPO: the helpers and post-processing of trl/experimental/ppo/ppo_trainer.py (itself a port of OpenAI's
lm-human-preferences via vwxyzjn/summarize_from_feedback_details), with TRL's names.

References: Bradley & Terry 1952; Touvron et al. 2023 (Llama 2, margin); Eisenstein et al. 2023 (centring, Eq. 2);
Schulman et al. 2016 (GAE); Schulman et al. 2017 (PPO); Schulman 2020, http://joschu.net/blog/kl-approx.html (k1, k3);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".

Mask convention, as in TRL: `mask` arguments of the `masked_*` helpers are True on *valid* positions;
`padding_mask` / `padding_mask_p1` are TRL's masks, True on *padding* (`idx > L` / `idx > L + 1`, L = last valid
response index). The PPO loop fills padded logprobs with INVALID_LOGPROB and padded values with 0 before calling these.

Usage (one PPO update; B rollouts of T response tokens):

    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)                          # (B, T)
    rewards, non_score_reward = compute_rewards(kl, kl_coef, scores, sequence_lengths)
    advantages, returns = compute_gae(rewards, values, gamma, lam)
    advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0)
    pg_loss, pg_clipfrac, ratio = ppo_policy_loss(new_logprobs, logprobs, advantages, padding_mask, cliprange)
    vf_loss, vf_clipfrac = ppo_value_loss(vpred, values, returns, padding_mask_p1, cliprange_value)
    loss = pg_loss + vf_coef * vf_loss
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

INVALID_LOGPROB = 1.0  # written into logprobs at padding (TRL ppo_trainer.py), so ratio = 1 and k1 = k3 = 0 there

KL_ESTIMATORS = ("k1", "k3")

# ---------------------------------------------------------------------------------------------------------------------
# Reward model


def reward_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Scalar reward-model loss from (B,) chosen and rejected rewards; `margin` is (B,) or None."""
    logits = rewards_chosen - rewards_rejected  # (B,)
    if margin is not None:
        logits = logits - margin  # Llama 2 margin (Touvron et al. 2023, Eq. 2)
    loss = -F.logsigmoid(logits).mean()  # Bradley-Terry NLL (Bradley & Terry 1952)
    if center_rewards_coefficient is not None:
        # centring auxiliary loss (Eisenstein et al. 2023, Eq. 2; TRL reward_trainer.py compute_loss)
        loss = loss + center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


@torch.no_grad()
def reward_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> dict[str, float]:
    """TRL's per-micro-batch reward metrics from (B,) rewards: min/mean/max over all 2B, accuracy (ties are wrong)
    and margin. Single process: under DDP, all-gather both tensors first (TRL's numbers when ranks hold equal B)."""
    rewards = torch.cat([rewards_chosen, rewards_rejected])  # (2B,)
    return {
        "min_reward": rewards.min().item(),
        "mean_reward": rewards.mean().item(),
        "max_reward": rewards.max().item(),
        "accuracy": (rewards_chosen > rewards_rejected).float().mean().item(),
        "margin": (rewards_chosen - rewards_rejected).mean().item(),
    }


def completion_loss(logprobs: torch.Tensor, labels: torch.Tensor,
                    num_items_in_batch: int | None = None) -> torch.Tensor:
    """SFT: the cross-entropy -log p(label) of (B, T - 1) log-probs of each next token (CausalLM.forward with
    targets) against (B, T) labels (-100 = not a target), summed and divided by num_items_in_batch (default: the
    number of targets here), as transformers' ForCausalLMLoss (loss_utils.py) computes it for TRL's SFTTrainer."""
    is_target = labels[:, 1:] != -100  # token t + 1 is predicted at position t
    loss = -logprobs.masked_fill(~is_target, 0).sum()
    return loss / (num_items_in_batch if num_items_in_batch is not None else is_target.sum())


# ---------------------------------------------------------------------------------------------------------------------
# Token-level helpers (TRL experimental/utils.py, trainer/utils.py, experimental/ppo/ppo_trainer.py)


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, shape bools.shape[:-1]; the row length where a row has none."""
    # argmax returns the first maximal index (TRL experimental/utils.py first_true_indices)
    first = bools.long().argmax(dim=-1)
    return torch.where(bools.any(dim=-1), first, bools.size(-1))


def truncate_response(stop_token_id: int, pad_token_id: int, responses: torch.Tensor) -> torch.Tensor:
    """(B, T) responses with every token after the first stop token set to pad; the stop token is kept and rows
    without one are unchanged (TRL ppo_trainer.py truncate_response)."""
    stop_idx = first_true_indices(responses == stop_token_id).unsqueeze(-1)  # (B, 1)
    idx = torch.arange(responses.size(-1), device=responses.device)  # (T,)
    return responses.masked_fill(idx > stop_idx, pad_token_id)


def gather_index(responses: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Response ids to gather logprobs at. A pad id may lie outside the vocabulary ([PAD] added without resizing), so
    pads read id 0; callers overwrite those positions with INVALID_LOGPROB."""
    return responses.masked_fill(responses == pad_token_id, 0)


def logprobs_from_logits(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[index]: (B, T, V) logits, (B, T) token ids -> (B, T) (TRL trainer/utils.py
    selective_log_softmax). Works one row of B at a time so no (B, T, V) temporary is made."""
    if logits.dtype in (torch.float32, torch.float64):
        # log_softmax(z)_i = z_i - logsumexp(z)
        logsumexp = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, T)
        return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - logsumexp
    # bf16/fp16: z_i - logsumexp(z) loses too much precision, so normalise each row with log_softmax first
    rows = zip(logits, index.unsqueeze(-1), strict=True)  # (T, V) and (T, 1) per row
    return torch.stack([row.log_softmax(-1).gather(-1, idx) for row, idx in rows]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, (..., V) -> (...) (TRL ppo_trainer.py `entropy` statistic)."""
    # H = logsumexp(z) - sum_i softmax(z)_i z_i, which equals -sum p log p
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


LOGITS_PER_CHUNK = 2**24  # logits chunked_logprobs makes at once: 64 MiB in fp32, 110 tokens at Qwen2's vocabulary


def chunked_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of `targets` under softmax(h weight^T / temperature), and with_entropy the entropies of that
    softmax, never holding more than one chunk of the logits: h (..., hidden) final hidden states, weight (V, hidden)
    the lm_head, targets (...) ids -> logprobs (...), entropy (...) or None. The entropy is a statistic without
    gradient (TRL takes its entropy under no_grad), taken from the same probabilities (LogSoftmaxAtTargets).

    The numbers of logprobs_from_logits and entropy_from_logits on the whole (..., V) logits
    F.linear(h, weight).float() / temperature, as TRL's PPO computes them, but made LOGITS_PER_CHUNK / V tokens at a
    time: at Qwen2's 151,936-token vocabulary the logits of 8 x 512 tokens are 2.5 GB per fp32 copy, and TRL makes
    several (huggingface/trl#4013). With several chunks, torch.utils.checkpoint frees each chunk's logits after its
    forward and recomputes them in its backward, so one chunk lives at a time in backward too; a lone chunk is kept.
    Liger Kernel's fused linear cross-entropy (Hsu et al. 2024) and Cut Cross-Entropy (Wijmans et al. 2024) fuse
    the same projection and loss with hand-written kernels."""
    chunk = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    h_chunks, target_chunks = h.reshape(-1, h.shape[-1]).split(chunk), targets.reshape(-1).split(chunk)
    recompute = torch.is_grad_enabled() and len(h_chunks) > 1
    chunks = [checkpoint(logprobs_and_entropy, h_c, weight, t_c, temperature, with_entropy, use_reentrant=False)
              if recompute else logprobs_and_entropy(h_c, weight, t_c, temperature, with_entropy)
              for h_c, t_c in zip(h_chunks, target_chunks, strict=True)]
    logprobs, entropy = zip(*chunks, strict=True)
    return torch.cat(logprobs).view(targets.shape), torch.cat(entropy).view(targets.shape) if with_entropy else None


def logprobs_and_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                         with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of chunked_logprobs: h (n, hidden), weight (V, hidden), targets (n,) -> logprobs (n,), entropy (n,)
    or None: the projection, then TRL's two formulas in one pass over the chunk's logits (LogSoftmaxAtTargets)."""
    logprobs, entropy = LogSoftmaxAtTargets.apply(F.linear(h, weight), targets, temperature)
    return logprobs, entropy if with_entropy else None


class LogSoftmaxAtTargets(torch.autograd.Function):
    """(n, V) logits, (n,) targets -> log_softmax(logits / temperature) at the targets, and the entropy of that softmax
    (a statistic: no gradient), both in fp32 (logprobs_from_logits and entropy_from_logits, the same numbers within
    rounding). Written out because autograd's version of these formulas makes ~8 (n, V) temporaries, each a pass
    over memory; this one makes two, and keeps the probabilities for the gradient:
      z = logits / t - max,  p = exp(z) / sum exp(z),  logprob = z[target] - log sum exp(z),  H = log sum exp(z) - p.z
      d logprob / d logits = (onehot(target) - p) / t.
    Each row is independent, so the passes run over LOGITS_PER_PASS logits at a time: a block small enough to stay
    in the CPU's cache between passes, where a whole chunk would go to main memory and back on every pass."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        p = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        logprobs, entropy = p.new_empty(len(p)), p.new_empty(len(p))
        with torch.autocast(logits.device.type, enabled=False):  # all in fp32, whatever the caller's autocast
            for rows in row_blocks(logits):
                z = logits[rows].float().div(temperature)
                z.sub_(z.amax(-1, keepdim=True))  # so exp cannot overflow
                p_rows = torch.exp(z, out=p[rows])
                total = p_rows.sum(-1)
                p_rows.div_(total[:, None])
                logsumexp = total.log()
                logprobs[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - logsumexp
                entropy[rows] = logsumexp - torch.linalg.vecdot(p_rows, z)
        ctx.save_for_backward(p, targets)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad, _):
        p, targets = ctx.saved_tensors
        t = ctx.temperature
        for rows in row_blocks(p):  # p is not needed again: its memory takes the gradient (no double backward)
            p[rows].mul_(-grad[rows, None]).scatter_add_(-1, targets[rows, None], grad[rows, None]).div_(t)
        return p.to(ctx.dtype), None, None


LOGITS_PER_PASS = 2**19  # 2 MiB in fp32: 32 rows at a 16k vocabulary, 3 at Qwen2's


def row_blocks(logits: torch.Tensor) -> list[slice]:
    """Slices of logits' rows, LOGITS_PER_PASS logits (at least one row) each on CPU; one slice on a GPU, whose kernels
    stream a whole chunk at memory speed and would only pay more launches."""
    rows = max(1, LOGITS_PER_PASS // logits.shape[-1] if logits.device.type == "cpu" else len(logits))
    return [slice(start, start + rows) for start in range(0, len(logits), rows)]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is True; NaN where the mask is empty."""
    return (x * mask).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the True positions of mask; unbiased raises on an empty mask and is inf for one position."""
    variance = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n == 0:
            raise ValueError("masked_var: the mask is all False (every position is padding); use a larger batch")
        variance = variance * (n / (n - 1))  # Bessel's correction, as TRL ppo_trainer.py masked_var
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the True positions of mask, applied to every position; keeps the mean if not shift_mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # 1e-8 as TRL ppo_trainer.py masked_whiten
    return whitened + mean if not shift_mean else whitened


# ---------------------------------------------------------------------------------------------------------------------
# PPO: rewards, advantages, losses (TRL experimental/ppo/ppo_trainer.py steps 4-6 and the update)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_estimator: str) -> torch.Tensor:
    """Per-token KL(policy || ref) estimate, (B, T); 0 where both logprobs hold INVALID_LOGPROB."""
    # k1 / k3 of Schulman 2020 "Approximating KL divergence", written as TRL does (with logr = ref - policy)
    logr = ref_logprobs - logprobs
    if kl_estimator == "k1":
        return -logr
    if kl_estimator == "k3":
        return (logr.exp() - 1) - logr  # TRL uses exp() - 1, not expm1(); kept for bitwise parity
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")


def compute_rewards(
    kl: torch.Tensor, kl_coef: float, scores: torch.Tensor, sequence_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T): -kl_coef * kl everywhere, plus the (B,) score at L + 1, or at L when L + 1 == T,
    with L = sequence_lengths (B,). Returns (rewards, non_score_reward)."""
    non_score_reward = -kl_coef * kl  # (B, T)
    rewards = non_score_reward.clone()
    # the score goes on the first padding slot after the response (lm-human-preferences; huggingface/trl#1893)
    sequence_lengths_p1 = sequence_lengths + 1
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)  # (B,)
    rewards[torch.arange(rewards.size(0), device=rewards.device), actual_end] += scores
    return rewards, non_score_reward


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, both (B, T), from (B, T) rewards and values; V after T is 0.
    Returns are advantages + values, taken before any whitening (TRL ppo_trainer.py step 6)."""
    # A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t (Schulman et al. 2016, Eq. 16)
    gen_length = rewards.size(1)
    advantages = torch.empty_like(rewards)
    lastgaelam = 0.0
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    return advantages, advantages + values


def ppo_policy_loss(
    new_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    padding_mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss over non-padding positions from (B, T) inputs. Returns (pg_loss, pg_clipfrac, ratio),
    ratio (B, T) unmasked: 1 at padding when both logprobs hold INVALID_LOGPROB there."""
    # L = -min(r A, clip(r, 1 - eps, 1 + eps) A) (Schulman et al. 2017, Eq. 7)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    return pg_loss, pg_clipfrac, ratio


def ppo_value_loss(
    vpred: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    padding_mask_p1: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max(sq errors)) over positions 0..L+1 from (B, T) inputs; values are the
    rollout's. Returns (vf_loss, vf_clipfrac)."""
    # value clipping around the rollout values (lm-human-preferences; Huang et al. 2024; TRL ppo_trainer.py)
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    return vf_loss, vf_clipfrac


# ---------------------------------------------------------------------------------------------------------------------
# Critic-free estimators (minirlhf.advantages): k samples per prompt, rows grouped [prompt 0 x k, prompt 1 x k, ...]


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) sequence rewards, B = prompts * k, k >= 2 -> (B,) advantages: each reward minus the mean of its k - 1
    siblings' (Ahmadian et al. 2024, Eq. 6; TRL rloo_trainer.py `_generate_and_score_completions`)."""
    grouped = rewards.view(-1, k)  # (prompts, k)
    baselines = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)  # leave-one-out mean
    return (grouped - baselines).view(-1)


def grpo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) sequence rewards, B = prompts * k, k >= 2 -> (B,) advantages (r - group mean) / (group std + 1e-4)
    (Shao et al. 2024, Sec. 4.1.2; TRL grpo_trainer.py with scale_rewards="group", its 1e-4 and unbiased std)."""
    grouped = rewards.view(-1, k)  # (prompts, k)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + 1e-4)).view(-1)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, T) per-token rewards -> (B, T) returns G_t = r_t + gamma * G_{t+1}, G_T = 0 (REINFORCE++, Hu 2025,
    Sec. 3; OpenRLHF `get_cumulative_returns`)."""
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def sequence_policy_loss(
    new_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    padding_mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RLOO's clipped surrogate on whole sequences: the ratio of (B, T) summed response logprobs, (B,) advantages,
    mean over sequences (TRL rloo_trainer.py `_compute_loss`). Returns (pg_loss, pg_clipfrac, ratio (B,))."""
    log_ratio = ((new_logprobs - logprobs) * ~padding_mask).sum(1)  # (B,)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    pg_clipfrac = (((ratio < 1 - cliprange) & (advantages < 0)) | ((ratio > 1 + cliprange) & (advantages > 0)))
    return pg_loss, pg_clipfrac.float().mean(), ratio
