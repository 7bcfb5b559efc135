"""minirlhf.losses against TRL 1.12.0: its own RewardTrainer and helper functions where they exist, and formulas
computed another way. Where TRL inlines a formula in trl/experimental/ppo/ppo_trainer.py, the tests named
test_transcribes_trl_* compare ours with those lines copied here: transcription checks (did we copy TRL's lines
faithfully?), near-copies of our own formulas, not independent parity. The independent oracle for them is
test_ppo.py's whole-update comparison with TRL's PPOTrainer (test_update_matches_trl, test_two_updates_match_trl).

Tolerances: fp32 1e-6 unless stated; identical op sequences are compared exactly (atol=0).
"""

import math

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from trl.experimental.ppo import ppo_trainer as trl_ppo
from trl.experimental.utils import first_true_indices as theirs_first_true_indices
from trl.trainer.utils import entropy_from_logits as theirs_entropy_from_logits
from trl.trainer.utils import selective_log_softmax

from minirlhf.losses import (
    INVALID_LOGPROB,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    first_true_indices,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reward_loss,
    reward_metrics,
    truncate_response,
)

PAD, STOP = 0, 1

# ---------------------------------------------------------------------------------------------------------------------
# Reward model: against trl.RewardTrainer.compute_loss on a tiny random Llama


@pytest.fixture(scope="module")
def reward_trainer(tmp_path_factory):
    """A RewardTrainer on a random 2-layer Llama seq-cls model, a word-level tokenizer and 4 preference rows."""
    import datasets
    import trl

    words = "the cat dog sat ran on a mat fast slow big small".split()
    vocab = {"<pad>": PAD, "<eos>": STOP, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=32, num_labels=1, pad_token_id=PAD,
    )
    model = transformers.LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards of order 1, so the loss terms are not all ~log 2
    dataset = datasets.Dataset.from_dict({
        "chosen": ["the cat sat on a mat", "a big dog ran fast", "the small cat", "dog sat"],
        "rejected": ["the dog ran", "a slow cat sat on the big mat", "cat", "the mat sat on a dog fast"],
        "margin": [0.5, 0.0, -0.25, 1.0],
    })
    args = trl.RewardConfig(
        output_dir=str(tmp_path_factory.mktemp("rm")), center_rewards_coefficient=0.01, bf16=False, use_cpu=True,
        report_to="none",
    )
    return trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("with_margin", [True, False])
def test_reward_loss_and_metrics_match_reward_trainer(reward_trainer, with_margin):
    keys = ["chosen_ids", "rejected_ids"] + (["margin"] if with_margin else [])
    rows = [{k: row[k] for k in keys} for row in reward_trainer.train_dataset]
    batch = reward_trainer.data_collator(rows)
    assert batch["input_ids"].shape[0] == 8 and (batch["input_ids"] == PAD).any()  # padded pairs, 2B rows
    model = reward_trainer.model

    reward_trainer._metrics["train"].clear()
    theirs_loss = reward_trainer.compute_loss(model, dict(batch))
    theirs_metrics = {k: v[-1] for k, v in reward_trainer._metrics["train"].items() if k != "num_tokens"}

    with torch.no_grad():  # the pooled rewards TRL's loss saw: one forward over chosen ++ rejected
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    rewards_chosen, rewards_rejected = rewards.chunk(2)  # (B,), (B,)
    ours_loss = reward_loss(rewards_chosen, rewards_rejected, batch.get("margin"), center_rewards_coefficient=0.01)
    ours_metrics = reward_metrics(rewards_chosen, rewards_rejected)

    torch.testing.assert_close(ours_loss, theirs_loss.detach(), rtol=0, atol=1e-6)
    assert ours_metrics.keys() == theirs_metrics.keys()
    for key in ours_metrics:
        assert ours_metrics[key] == pytest.approx(theirs_metrics[key], abs=1e-6), key


def test_reward_loss_formula_with_and_without_margin():
    r_chosen = [1.5, 2.0, -3.0, 40.0]
    r_rejected = [0.5, 2.0, 4.0, -40.0]  # a tie, a wrong order and a saturated pair
    margin = [0.3, 0.0, -1.0, 2.0]
    eta = 0.01
    ours = lambda m, c: reward_loss(torch.tensor(r_chosen), torch.tensor(r_rejected), m, c).item()
    # -log sigmoid(d) = log(1 + e^-d), in float64 python
    nll = lambda ds: sum(math.log1p(math.exp(-d)) for d in ds) / len(ds)
    diffs = [c - r for c, r in zip(r_chosen, r_rejected, strict=True)]
    centring = eta * sum((c + r) ** 2 for c, r in zip(r_chosen, r_rejected, strict=True)) / len(diffs)

    assert ours(None, None) == pytest.approx(nll(diffs), abs=1e-6)
    theirs_margin = nll([d - m for d, m in zip(diffs, margin, strict=True)])
    assert ours(torch.tensor(margin), None) == pytest.approx(theirs_margin, abs=1e-6)
    assert ours(torch.tensor(margin), eta) == pytest.approx(theirs_margin + centring, abs=1e-6)
    assert reward_loss(torch.tensor([-100.0]), torch.tensor([0.0])).item() == pytest.approx(100.0)  # no overflow

    ours_metrics = reward_metrics(torch.tensor(r_chosen), torch.tensor(r_rejected))
    theirs_metrics = {
        "min_reward": -40.0, "mean_reward": sum(r_chosen + r_rejected) / 8, "max_reward": 40.0,
        "accuracy": 2 / 4,  # the tie counts as wrong
        "margin": sum(diffs) / 4,
    }
    assert ours_metrics == pytest.approx(theirs_metrics, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Token-level helpers: against TRL's own functions


def test_first_true_indices_matches_trl():
    bools = torch.rand(3, 7, 9) < 0.15
    bools[0, 0] = False  # a row with no True
    bools[0, 1] = True  # a row of all True
    theirs = theirs_first_true_indices(bools)
    assert bools.any(-1).logical_not().any()  # the "row length" case is exercised
    torch.testing.assert_close(first_true_indices(bools), theirs, rtol=0, atol=0)
    assert first_true_indices(bools).dtype == torch.long


def test_truncate_response_matches_trl():
    responses = torch.randint(2, 10, (6, 9))
    responses[0, 3] = STOP  # one stop token
    responses[1, [2, 6]] = STOP  # two: cut after the first
    responses[2, 0] = STOP  # stop at the first position
    responses[3, 8] = STOP  # stop at the last position
    responses[4] = PAD  # all padding; row 5 has no stop token
    theirs = trl_ppo.truncate_response(STOP, PAD, responses)
    ours = truncate_response(STOP, PAD, responses)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (ours[5] == responses[5]).all() and ours[1, 2] == STOP and (ours[1, 3:] == PAD).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logprobs_from_logits_matches_selective_log_softmax(dtype):
    logits = (3 * torch.randn(3, 5, 50)).to(dtype)
    index = torch.randint(0, 50, (3, 5))
    ours = logprobs_from_logits(logits, index)
    torch.testing.assert_close(ours, selective_log_softmax(logits, index), rtol=0, atol=0)
    theirs_naive = logits.float().log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    tol = 1e-5 if dtype != torch.bfloat16 else 0.1  # bf16 rounds the result to ~3 significant digits
    torch.testing.assert_close(ours.float(), theirs_naive, rtol=0, atol=tol)


def test_entropy_from_logits_matches_trl():
    logits = 3 * torch.randn(2, 6, 40)
    ours = entropy_from_logits(logits)
    # TRL's PPO statistic (ppo_trainer.py:855-856) is the same formula; trainer/utils.py computes -sum p log p
    theirs_ppo = torch.logsumexp(logits, dim=-1) - torch.sum(torch.softmax(logits, dim=-1) * logits, dim=-1)
    torch.testing.assert_close(ours, theirs_ppo, rtol=0, atol=0)
    torch.testing.assert_close(ours, theirs_entropy_from_logits(logits), rtol=0, atol=1e-5)


@pytest.fixture
def values_and_mask():
    x = torch.randn(5, 8)
    mask = torch.rand(5, 8) < 0.7
    mask[2] = False  # an all-padding row
    mask[0, :2] = True
    return x, mask


def test_masked_mean_var_whiten_match_trl(values_and_mask):
    x, mask = values_and_mask
    torch.testing.assert_close(masked_mean(x, mask), trl_ppo.masked_mean(x, mask), rtol=0, atol=1e-6)
    # 0 / 0 on the all-padding row
    assert masked_mean(x[2], mask[2]).isnan() and trl_ppo.masked_mean(x[2], mask[2]).isnan()
    for unbiased in (True, False):
        ours = masked_var(x, mask, unbiased=unbiased)
        torch.testing.assert_close(ours, trl_ppo.masked_var(x, mask, unbiased=unbiased), rtol=0, atol=1e-6)
    for shift_mean in (True, False):
        ours = masked_whiten(x, mask, shift_mean=shift_mean)
        theirs = trl_ppo.masked_whiten(x, mask, shift_mean=shift_mean)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # an independent check: the whitened valid entries have mean 0 and unbiased std 1
    whitened = masked_whiten(x, mask)[mask].double()
    assert abs(whitened.mean().item()) < 1e-6 and whitened.std().item() == pytest.approx(1.0, abs=1e-6)


def test_masked_var_empty_mask_raises_like_trl():
    x, empty = torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError):
        trl_ppo.masked_var(x, empty)
    with pytest.raises(ValueError, match="mask is all False"):
        masked_var(x, empty)


# ---------------------------------------------------------------------------------------------------------------------
# PPO post-processing and losses: transcription checks against lines of trl/experimental/ppo/ppo_trainer.py (TRL
# 1.12.0) copied here, near-copies of our own formulas: they catch a slip in copying, not a shared misreading. The
# independent oracle is test_ppo.py's whole-update comparison with TRL's PPOTrainer (test_update_matches_trl,
# test_two_updates_match_trl); the checks computed another way below (k3 >= 0, GAE as discounted sums) are marked.


def test_transcribes_trl_kl_penalty():
    """kl_penalty vs TRL's lines for k1 and k3, transcribed; independently, k3 is non-negative."""
    logprobs, ref_logprobs = -3 * torch.rand(4, 6), -3 * torch.rand(4, 6)
    logprobs[:, 4:] = ref_logprobs[:, 4:] = INVALID_LOGPROB  # padding
    logr = ref_logprobs - logprobs  # TRL ppo_trainer.py:773-774
    theirs = {"k1": -logr, "k3": (logr.exp() - 1) - logr}
    for kl_estimator, theirs_kl in theirs.items():
        ours = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        torch.testing.assert_close(ours, theirs_kl, rtol=0, atol=0)
        assert (ours[:, 4:] == 0).all()
    # k3 is the Bregman form: non-negative everywhere (Schulman 2020)
    assert (kl_penalty(logprobs, ref_logprobs, "k3") >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logprobs, ref_logprobs, "k2")


@pytest.fixture
def rollout():
    """A post-processed batch as TRL's step 4 sees it, with L = -1 (empty), mid-length and L = T - 1 (full) rows."""
    B, T = 6, 8
    sequence_lengths = torch.tensor([3, -1, T - 1, 0, 5, T - 2])  # (B,) L, the last valid response index
    response_idxs = torch.arange(T).repeat(B, 1)  # ppo_trainer.py:763-768
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    padding_mask_p1 = response_idxs > (sequence_lengths + 1).unsqueeze(1)
    logprobs = (-3 * torch.rand(B, T)).masked_fill(padding_mask, INVALID_LOGPROB)
    ref_logprobs = (-3 * torch.rand(B, T)).masked_fill(padding_mask, INVALID_LOGPROB)
    values = torch.randn(B, T).masked_fill(padding_mask_p1, 0)
    scores = torch.randn(B)
    return dict(sequence_lengths=sequence_lengths, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1,
                logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores)


def theirs_rewards(kl, kl_coef, scores, sequence_lengths):
    """TRL's lines, transcribed: ppo_trainer.py:775-779."""
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    sequence_lengths_p1 = sequence_lengths + 1
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    return rewards, non_score_reward


def theirs_gae(rewards, values, gamma, lam):
    """TRL's lines, transcribed: ppo_trainer.py:787-796."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_transcribes_trl_compute_rewards(rollout, kl_estimator):
    """compute_rewards vs TRL's lines, transcribed; where the score lands on an empty, a mid-length and a full row."""
    kl = kl_penalty(rollout["logprobs"], rollout["ref_logprobs"], kl_estimator)
    ours = compute_rewards(kl, 0.05, rollout["scores"], rollout["sequence_lengths"])
    theirs = theirs_rewards(kl, 0.05, rollout["scores"], rollout["sequence_lengths"])
    for ours_t, theirs_t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(ours_t, theirs_t, rtol=0, atol=0)
    rewards = ours[0]
    assert rewards[1, 0] == rollout["scores"][1]  # L = -1: the score lands on slot 0
    assert rewards[2, -1] == pytest.approx(rollout["scores"][2] + ours[1][2, -1])  # full row: on L = T - 1
    assert rewards[0, 4] == rollout["scores"][0]  # L = 3: on the first padding slot, where kl is 0


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_transcribes_trl_gae_and_matches_discounted_sums(rollout, gamma, lam):
    """compute_gae vs TRL's loop, transcribed; independently, vs the discounted sums of TD residuals in float64."""
    kl = kl_penalty(rollout["logprobs"], rollout["ref_logprobs"], "k1")
    rewards, _ = compute_rewards(kl, 0.05, rollout["scores"], rollout["sequence_lengths"])
    values = rollout["values"]
    ours_advantages, ours_returns = compute_gae(rewards, values, gamma, lam)
    theirs_advantages, theirs_returns = theirs_gae(rewards, values, gamma, lam)
    torch.testing.assert_close(ours_advantages, theirs_advantages, rtol=0, atol=0)
    torch.testing.assert_close(ours_returns, theirs_returns, rtol=0, atol=0)

    # independent float64 reference: A_t = sum_l (gamma lam)^l delta_{t+l} (Schulman et al. 2016, Eq. 16)
    r, v = rewards.double(), values.double()
    B, T = r.shape
    v_next = torch.cat([v[:, 1:], torch.zeros(B, 1, dtype=v.dtype)], dim=1)
    deltas = r + gamma * v_next - v  # (B, T)
    discounts = torch.tensor([[(gamma * lam) ** (k - t) if k >= t else 0.0 for k in range(T)] for t in range(T)],
                             dtype=torch.float64)  # (T, T), row t weights delta_k for k >= t
    theirs_advantages64 = deltas @ discounts.T
    torch.testing.assert_close(ours_advantages.double(), theirs_advantages64, rtol=0, atol=1e-5)
    ours_advantages64, ours_returns64 = compute_gae(r, v, gamma, lam)
    torch.testing.assert_close(ours_advantages64, theirs_advantages64, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_returns64, theirs_advantages64 + v, rtol=0, atol=1e-12)

    # TRL's GAE: the value target at the slot after the response is the score itself, whatever gamma is
    for i, L in enumerate(rollout["sequence_lengths"].tolist()):
        if L + 1 < T:
            assert ours_returns[i, L + 1].item() == pytest.approx(rollout["scores"][i].item(), abs=1e-6)


def test_transcribes_trl_ppo_losses(rollout):
    """ppo_policy_loss and ppo_value_loss (losses, clip fractions, ratios, gradients) vs TRL's lines, transcribed."""
    padding_mask, padding_mask_p1 = rollout["padding_mask"], rollout["padding_mask_p1"]
    logprobs, values = rollout["logprobs"], rollout["values"]
    advantages = masked_whiten(torch.randn(values.shape), ~padding_mask).masked_fill(padding_mask, 0)
    returns = values + torch.randn(values.shape)
    cliprange = cliprange_value = 0.2
    new_logprobs_raw = logprobs + 0.3 * torch.randn(values.shape)
    vpred_raw = values + 0.3 * torch.randn(values.shape)

    # theirs, transcribed: ppo_trainer.py:822-846 (the loop fills padding before the losses)
    theirs_new = new_logprobs_raw.clone().requires_grad_(True)
    theirs_vpred_in = vpred_raw.clone().requires_grad_(True)
    new_logprobs = torch.masked_fill(theirs_new, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(theirs_vpred_in, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    theirs_vf_loss = 0.5 * trl_ppo.masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    theirs_vf_clipfrac = trl_ppo.masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    theirs_ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * theirs_ratio
    pg_losses2 = -advantages * torch.clamp(theirs_ratio, 1.0 - cliprange, 1.0 + cliprange)
    theirs_pg_loss = trl_ppo.masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    theirs_pg_clipfrac = trl_ppo.masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    (theirs_pg_loss + 0.1 * theirs_vf_loss).backward()

    # ours: logprobs filled as the loop does; vpred left raw (the masked mean ignores padded slots)
    ours_new = new_logprobs_raw.clone().requires_grad_(True)
    ours_vpred = vpred_raw.clone().requires_grad_(True)
    ours_pg_loss, ours_pg_clipfrac, ours_ratio = ppo_policy_loss(
        ours_new.masked_fill(padding_mask, INVALID_LOGPROB), logprobs, advantages, padding_mask, cliprange
    )
    ours_vf_loss, ours_vf_clipfrac = ppo_value_loss(ours_vpred, values, returns, padding_mask_p1, cliprange_value)
    (ours_pg_loss + 0.1 * ours_vf_loss).backward()

    assert 0 < theirs_pg_clipfrac < 1 and 0 < theirs_vf_clipfrac < 1  # both branches of each max are exercised
    pairs = [(ours_pg_loss, theirs_pg_loss), (ours_pg_clipfrac, theirs_pg_clipfrac), (ours_ratio, theirs_ratio),
             (ours_vf_loss, theirs_vf_loss), (ours_vf_clipfrac, theirs_vf_clipfrac),
             (ours_new.grad, theirs_new.grad), (ours_vpred.grad, theirs_vpred_in.grad)]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours_ratio[padding_mask] == 1).all()  # the INVALID_LOGPROB sentinel makes padded ratios exactly 1
