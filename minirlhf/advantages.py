"""From scored rollouts to advantages, for each `advantage_estimator` of minirlhf.ppo, and the policy loss that goes
with it. One rank's rollouts; with k = num_generations samples per prompt, rows come grouped [prompt 0 x k, ...].

- "gae": TRL 1.12's PPOTrainer (trl/experimental/ppo/ppo_trainer.py, Response Processing 3 and steps 4-6): per-token
  KL rewards with the score at L + 1, GAE with a value model, whitened advantages; per-token clipped loss.
- "rloo": TRL 1.12's RLOOTrainer (trl/trainer/rloo_trainer.py; Ahmadian et al. 2024): the score minus kl_coef times
  the summed KL is each sequence's reward, minus the mean of its k - 1 siblings'; clipped loss on sequence ratios.
- "grpo": TRL 1.12's GRPOTrainer (trl/trainer/grpo_trainer.py; Shao et al. 2024) with its defaults (scale_rewards
  "group", loss_type "dapo", use_bias_correction_kl): (score - group mean) / (group std + 1e-4) on every token;
  the KL to the reference (k3 times the ratio, weight kl_coef = TRL's beta) is in the per-token loss, not the reward.
- "reinforce_pp": REINFORCE++ (Hu 2025, arXiv 2501.03262; OpenRLHF): per-token KL rewards with the score on the last
  token, discounted returns, normalised over this rank's whole batch (not per prompt); per-token clipped loss.

Only "gae" reads a value model (`raw_values`); the others return no values or returns.
"""

import torch

from minirlhf.losses import (
    INVALID_LOGPROB,
    compute_gae,
    compute_rewards,
    discounted_returns,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    rloo_advantages,
    sequence_policy_loss,
)

ESTIMATORS = ("gae", "rloo", "grpo", "reinforce_pp")


@torch.no_grad()
def compute_advantages(rollouts: dict[str, torch.Tensor], args, eos_token_id: int | None) -> dict[str, torch.Tensor]:
    """The rest of TRL's no-grad rollout phase: the missing-EOS penalty, padding masks, KL, rewards, advantages.
    Returns the rollouts extended with what the update and the metrics read, under TRL's names: logprobs,
    ref_logprobs (and values) masked, scores penalised; advantages (B, T), or (B,) for "rloo"."""
    responses, sequence_lengths = rollouts["responses"], rollouts["sequence_lengths"]
    # Response Processing 3. Filter completion: responses without EOS get a lower score (EOS, not the stop token)
    contain_eos_token = torch.any(rollouts["postprocessed_responses"] == eos_token_id, dim=-1)
    scores = rollouts["raw_scores"].clone()  # (B,)
    if args.missing_eos_penalty is not None:
        scores[~contain_eos_token] -= args.missing_eos_penalty

    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)  # (B, T)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)  # (B, T): True after L
    logprobs = rollouts["raw_logprobs"].masked_fill(padding_mask, INVALID_LOGPROB)
    ref_logprobs = rollouts["raw_ref_logprobs"].masked_fill(padding_mask, INVALID_LOGPROB)
    kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator)  # (B, T), 0 at padding
    out = {**rollouts, "scores": scores, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
           "padding_mask": padding_mask, "kl": kl}
    if args.advantage_estimator == "gae":
        return {**out, **gae(out, args)}
    non_score_reward = -args.kl_coef * kl  # (B, T)
    k = args.num_generations
    if args.advantage_estimator == "rloo":
        # TRL: rewards - beta * (per_token_kl * completion_mask).sum(-1), the KL of the sampling policy
        advantages = rloo_advantages(scores + non_score_reward.sum(1), k)  # (B,)
    elif args.advantage_estimator == "grpo":
        advantages = grpo_advantages(scores, k)[:, None].expand_as(kl).masked_fill(padding_mask, 0)  # (B, T)
    else:  # reinforce_pp: the score on the last token L (OpenRLHF compute_reward), KL rewards on every token
        rewards = non_score_reward.clone()
        rewards[torch.arange(len(rewards), device=rewards.device), sequence_lengths] += scores
        returns = discounted_returns(rewards, args.gamma)
        advantages = masked_whiten(returns, ~padding_mask).masked_fill(padding_mask, 0)  # Hu 2025, Eq. 8
    return {**out, "non_score_reward": non_score_reward, "advantages": advantages}


def gae(out: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """TRL's PPO steps 4-6: values masked after L + 1, KL rewards with the score at L + 1, optional whitening of
    the rewards, GAE, whitened advantages."""
    padding_mask, sequence_lengths = out["padding_mask"], out["sequence_lengths"]
    response_idxs = torch.arange(padding_mask.shape[1], device=padding_mask.device).repeat(padding_mask.shape[0], 1)
    padding_mask_p1 = response_idxs > (sequence_lengths + 1).unsqueeze(1)  # keeps L + 1 for the value function
    # be very careful with `padding_mask_p1` (TRL's warning): values keep the slot after the last token
    values = out["raw_values"].masked_fill(padding_mask_p1, 0)
    # 4. compute rewards
    rewards, non_score_reward = compute_rewards(out["kl"], args.kl_coef, out["scores"], sequence_lengths)
    # 5. whiten rewards
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0)
    # 6. compute advantages and returns
    advantages, returns = compute_gae(rewards, values, args.gamma, args.lam)  # returns before whitening
    advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0)
    return {"values": values, "padding_mask_p1": padding_mask_p1, "non_score_reward": non_score_reward,
            "rewards": rewards, "advantages": advantages, "returns": returns}


def policy_loss(new_logprobs: torch.Tensor, mb: dict[str, torch.Tensor],
                args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The estimator's policy loss of one micro-batch `mb` (its rows of the batch above) from the (b, T) new
    logprobs, INVALID_LOGPROB at padding. Returns (pg_loss, pg_clipfrac, ratio)."""
    if args.advantage_estimator == "rloo":
        return sequence_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mb["padding_mask"],
                                    args.cliprange)
    pg_loss, pg_clipfrac, ratio = ppo_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"],
                                                  mb["padding_mask"], args.cliprange)
    if args.advantage_estimator == "grpo" and args.kl_coef != 0:
        # TRL: per_token_loss + beta * per_token_kl, k3 of the current policy against the reference, times the ratio
        # (its default use_bias_correction_kl: the tokens were sampled from the old policy, not the current one)
        kl = kl_penalty(new_logprobs, mb["ref_logprobs"], "k3") * ratio
        pg_loss = pg_loss + args.kl_coef * masked_mean(kl, ~mb["padding_mask"])
    return pg_loss, pg_clipfrac, ratio
