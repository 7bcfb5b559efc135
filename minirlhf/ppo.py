"""PPO for RLHF: TRL's PPOTrainer (trl.experimental.ppo, last shipped in TRL 1.12) as one flat loop.

References: Schulman et al. 2017 (PPO); Ziegler et al. 2019 and Ouyang et al. 2022 (RLHF with a KL penalty);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"; TRL trl/experimental/ppo/ppo_config.py and
ppo_trainer.py (spec §4-§5).

Run: `python -m minirlhf.ppo configs/ppo.toml [--key value ...]`, or under `torchrun -m` for several ranks;
`--help` lists every key.

PPOConfig keeps TRL's names and defaults. TRL keys left out, accepted only at TRL's default (see --help):
`dataset_num_proc` (prompts are tokenized in the main process), `push_to_hub`, the PEFT adapter names
`model_adapter_name` / `ref_adapter_name`, and `ds3_gather_for_generation` (DeepSpeed ZeRO-3 only).

Outputs in `output_dir`: the policy (Hugging Face causal-LM layout, with the tokenizer), the value model in
`value_model/` (sequence-classification layout), `checkpoint-<update>/` folders, `metrics.jsonl` (TRL's keys, one line
per update), `completions.jsonl` (sample completions on the eval prompts) and `config.toml`.

Departures from TRL, each marked at its line: one optimizer step per minibatch whatever the gradient accumulation
(TRL's accelerate cadence differs when GA > 1, spec §5.7); gradient checkpointing, bf16/fp16 autocast and
`max_grad_norm` clipping are applied (TRL ignores them, §5.12); minibatch permutations come from a seeded torch
generator (TRL: unseeded NumPy); behaviour logprobs are gathered during generation, so no (B, T, vocab) logits are
kept; the value model is saved and a run resumes exactly from a checkpoint (TRL can do neither, pitfalls 13-14);
sample completions run on rank 0 with their own generator. PPO logs every update, so `logging_steps` and
`eval_strategy` have no effect (as in TRL).

Several ranks: DDP by default; `fsdp = "full_shard"` shards all four models with FSDP2 (TRL's PPO has DeepSpeed
ZeRO-3 instead). Sampling gathers the whole policy on each rank first, as TRL's ds3_gather_for_generation does;
the sharded reward model scores sample completions with every rank taking part, so every rank computes them.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from minirlhf import toytask
from minirlhf.checkpoint import full_model_state, load_checkpoint, resolve_resume, save_checkpoint
from minirlhf.common import (
    MetricsLogger,
    all_reduce,
    autocast,
    cleanup_distributed,
    gather,
    gathered_weights,
    gradient_sync,
    init_distributed,
    print0,
    require_torchrun_for_fsdp,
    resolve_precision,
    seed_everything,
    shard_model,
)
from minirlhf.config import (
    TrainingConfig,
    config_to_toml,
    exit_on_bad_input,
    parse_config_or_exit,
    require,
    save_config,
    steps_from,
)
from minirlhf.data import collate_prompts, load_rows, prepare_prompt_dataset, prompt_batches
from minirlhf.generate import generate
from minirlhf.losses import (
    INVALID_LOGPROB,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    first_true_indices,
    kl_penalty,
    logprobs_from_logits,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    truncate_response,
)
from minirlhf.model import CausalLM, RewardModel, disable_dropout
from minirlhf.optim import AdamW, lr_multiplier, param_groups, schedule_kwargs, set_lr, warmup_steps_from
from minirlhf.tokenizer import Tokenizer


@dataclass
class PPOConfig(TrainingConfig):
    """PPO (TRL experimental PPOConfig: TrainingArguments + TRL's defaults + the fields below)."""

    trl_defaults_only: ClassVar[dict[str, object]] = {
        "dataset_num_proc": None, "push_to_hub": False, "model_adapter_name": None, "ref_adapter_name": None,
        "ds3_gather_for_generation": True,
    }

    # ---- models
    learning_rate: float = 3e-6
    """peak AdamW learning rate, shared by the policy and the value model (TRL PPOConfig's default)"""
    sft_model_path: str = "EleutherAI/pythia-160m"
    """the policy's starting point (an SFT causal LM); also the frozen reference policy"""
    reward_model_path: str = "EleutherAI/pythia-160m"
    """sequence-classification model that scores responses; also initialises the value model"""

    # ---- rollouts
    total_episodes: int | None = None
    """prompts to train on in total; None: int(num_train_epochs * len(train dataset))"""
    num_mini_batches: int = 1
    """minibatches each batch of rollouts is split into, one optimizer step each"""
    num_ppo_epochs: int = 4
    """passes of PPO optimisation over each batch of rollouts"""
    local_rollout_forward_batch_size: int = 64
    """sequences per rank per no-grad forward (generation, reference, value and reward)"""
    response_length: int = 53
    """new tokens sampled per prompt (max_new_tokens)"""
    temperature: float = 0.7
    """sampling temperature (TRL adds 1e-7 wherever it divides by it)"""
    stop_token: str | None = None
    """"eos": stop and truncate responses at the tokenizer's EOS; cannot be combined with stop_token_id"""
    stop_token_id: int | None = None
    """token id to stop and truncate responses at; None (and no stop_token): responses run to response_length"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of responses that contain no EOS token"""
    num_sample_generations: int = 10
    """times to print greedy sample completions during training (0: never)"""

    # ---- rewards and losses
    kl_coef: float = 0.05
    """beta, the weight of the per-token KL penalty against the reference policy"""
    kl_estimator: str = "k1"
    """per-token KL estimate: "k1" (log-ratio) or "k3" (lower variance; Schulman's "Approximating KL Divergence")"""
    whiten_rewards: bool = False
    """whiten the per-token rewards over this rank's rollouts before GAE (TRL asks local_mini_batch_size >= 8)"""
    cliprange: float = 0.2
    """epsilon of the clipped policy-ratio objective"""
    cliprange_value: float = 0.2
    """clip range of the value predictions around their rollout values"""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    toytask_gold_score: bool = False
    """also log objective/gold_score, minirlhf.toytask's exact score of each response (for that task's prompts only)"""

    # ---- filled at runtime by set_runtime_sizes (PPOTrainer.__init__ in TRL); cannot be set in a config
    world_size: int | None = field(default=None, init=False)
    """number of processes (ranks)"""
    local_batch_size: int | None = field(default=None, init=False)
    """rollouts per rank per PPO update: HF's per_device_train_batch_size * gradient_accumulation_steps"""
    micro_batch_size: int | None = field(default=None, init=False)
    """sequences per forward/backward over all ranks: HF's per_device_train_batch_size * world_size"""
    batch_size: int | None = field(default=None, init=False)
    """rollouts per PPO update over all ranks: local_batch_size * world_size"""
    mini_batch_size: int | None = field(default=None, init=False)
    """rollouts per optimizer step over all ranks: batch_size / num_mini_batches"""
    local_mini_batch_size: int | None = field(default=None, init=False)
    """rollouts per optimizer step per rank: local_batch_size / num_mini_batches"""
    num_total_batches: int | None = field(default=None, init=False)
    """PPO updates in the run: ceil(total_episodes / batch_size), so the run may exceed total_episodes"""
    sample_generations_freq: int | None = field(default=None, init=False)
    """print sample completions every this many updates (None when num_sample_generations is 0)"""
    local_seed: int | None = field(default=None, init=False)
    """this rank's sampling seed: seed + rank * 100003"""

    def __post_init__(self):
        super().__post_init__()
        for key in ("num_mini_batches", "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)!r}")
        require(self.stop_token in (None, "eos"), "stop_token",
                f"{self.stop_token!r} is not 'eos' or none (no stop token)")
        # TRL tests `stop_token and stop_token_id`, so it lets stop_token_id=0 through; we test for None.
        require(self.stop_token is None or self.stop_token_id is None, "stop_token",
                "set stop_token or stop_token_id, not both")
        require(self.kl_estimator in ("k1", "k3"), "kl_estimator", f"{self.kl_estimator!r} is not 'k1' or 'k3'")
        # PPO counts updates, not optimizer steps (TRL ignores both keys; we refuse rather than do nothing)
        require(self.max_steps == -1, "max_steps", "PPO's length is total_episodes (or num_train_epochs)")
        require(self.save_strategy != "epoch", "save_strategy", "PPO saves every save_steps updates ('steps') or 'no'")

    def set_runtime_sizes(self, world_size: int, train_dataset_len: int, rank: int = 0) -> None:
        """Fill the runtime block from the number of ranks and prompts, as TRL's PPOTrainer.__init__ does."""
        if self.total_episodes is None:  # episodes given in epochs
            self.total_episodes = int(self.num_train_epochs * train_dataset_len)
        self.world_size = world_size
        self.local_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.micro_batch_size = self.per_device_train_batch_size * world_size
        self.batch_size = self.local_batch_size * world_size
        for key, of in (("mini_batch_size", "batch_size"), ("local_mini_batch_size", "local_batch_size")):
            size = getattr(self, of)
            require(size % self.num_mini_batches == 0, "num_mini_batches",
                    f"{of} = {size} is not a multiple of num_mini_batches = {self.num_mini_batches}")
            setattr(self, key, size // self.num_mini_batches)
        require(not self.whiten_rewards or self.local_mini_batch_size >= 8, "whiten_rewards",
                f"needs local_mini_batch_size >= 8 for whitening, got {self.local_mini_batch_size}")
        self.num_total_batches = math.ceil(self.total_episodes / self.batch_size)
        if self.num_sample_generations > 0:
            self.sample_generations_freq = max(1, self.num_total_batches // self.num_sample_generations)
        self.local_seed = self.seed + rank * 100003  # TRL: a prime offset per rank


# ---------------------------------------------------------------------------------------------------------------------
# Forwards (TRL ppo_trainer.py `forward`, experimental/utils.py `get_reward`)


def model_inputs(query_responses: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) as TRL's forward() builds them: pads are masked out and read as id 0
    (so a pad id outside the embedding works), positions count from each row's first real token."""
    attention_mask = query_responses != pad_token_id  # (B, T)
    position_ids = attention_mask.cumsum(1) - attention_mask.long()  # (B, T)
    return query_responses.masked_fill(~attention_mask, 0), attention_mask, position_ids


def gather_index(responses: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Response ids to gather logprobs at. A pad id may lie outside the vocabulary ([PAD] added without resizing), so
    pads read id 0; those positions are overwritten with INVALID_LOGPROB anyway."""
    return responses.masked_fill(responses == pad_token_id, 0)


def get_reward(model: RewardModel, query_responses: torch.Tensor, pad_token_id: int, context_length: int):
    """Per-token scores (B, T, 1), the score (B,) at the last token before the first pad of the response part, and
    that index (B,); the prompt's left padding is ignored, an empty response is scored at its prompt's last token."""
    reward_logits = model.token_scores(*model_inputs(query_responses, pad_token_id))  # (B, T, 1)
    sequence_lengths = first_true_indices(query_responses[:, context_length:] == pad_token_id) - 1 + context_length
    rows = torch.arange(len(reward_logits), device=reward_logits.device)
    return reward_logits, reward_logits[rows, sequence_lengths].squeeze(-1), sequence_lengths


class PolicyAndValue(nn.Module):
    """The policy and the value model as one module, so one optimizer and one DDP wrapper cover both (TRL's
    PolicyAndValueWrapper): (B, T) inputs -> logits (B, logits_to_keep, vocab) of the last positions (all when 0)
    and values (B, T) at every position."""

    def __init__(self, policy: CausalLM, value_model: RewardModel):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        values = self.value_model.token_scores(input_ids, attention_mask, position_ids).squeeze(-1)
        return self.policy(input_ids, attention_mask, position_ids, logits_to_keep=logits_to_keep), values


# ---------------------------------------------------------------------------------------------------------------------
# One PPO update: rollouts (no grad), then PPO epochs over minibatches


@torch.no_grad()
def sample_responses(policy: CausalLM, queries: torch.Tensor, args: PPOConfig, pad_token_id: int,
                     stop_token_id: int | None, precision: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to response_length tokens for (B, context_length) left-padded queries in chunks of
    local_rollout_forward_batch_size. Returns query_responses (B, context_length + T) and the behaviour logprobs
    (B, T), gathered while sampling (TRL keeps the (B, T, vocab) scores and takes them afterwards)."""
    query_responses, logprobs = [], []
    with gathered_weights(policy, args.fsdp):  # FSDP: the whole policy on every rank, once for all chunks
        for i in range(0, len(queries), args.local_rollout_forward_batch_size):
            with autocast(queries.device, precision):
                out = generate(policy, queries[i : i + args.local_rollout_forward_batch_size], pad_token_id,
                               args.response_length, temperature=args.temperature + 1e-7, top_k=0, top_p=1.0,
                               stop_token_id=stop_token_id)
            query_responses.append(out.query_responses)
            logprobs.append(out.logprobs)
    # a chunk whose rows all stopped early is shorter: right-pad it (TRL's batch_generation)
    width = max(qr.shape[1] for qr in query_responses)
    query_responses = [F.pad(qr, (0, width - qr.shape[1]), value=pad_token_id) for qr in query_responses]
    logprobs = [F.pad(lp, (0, width - queries.shape[1] - lp.shape[1]), value=INVALID_LOGPROB) for lp in logprobs]
    return torch.cat(query_responses), torch.cat(logprobs)


@torch.no_grad()
def score_responses(ref_policy: CausalLM, value_model: RewardModel, reward_model: RewardModel, queries: torch.Tensor,
                    query_responses: torch.Tensor, logprobs: torch.Tensor, args: PPOConfig, pad_token_id: int,
                    stop_token_id: int | None, precision: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Reference logprobs, values and scores of sampled responses, in chunks of local_rollout_forward_batch_size
    (§5.3 step 4). Returns the rollouts: every tensor (B, T) but sequence_lengths and scores (B,)."""
    context_length = queries.shape[1]
    device = queries.device
    out = {key: [] for key in ("ref_logprobs", "postprocessed_responses", "sequence_lengths", "values", "scores")}
    for i in range(0, len(queries), args.local_rollout_forward_batch_size):
        query = queries[i : i + args.local_rollout_forward_batch_size]
        query_response = query_responses[i : i + args.local_rollout_forward_batch_size]
        response = query_response[:, context_length:]  # (b, T)
        with autocast(device, precision):
            # logits from the last query token to the one before the last response token: (b, T, vocab)
            ref_logits = ref_policy(*model_inputs(query_response, pad_token_id),
                                    logits_to_keep=response.shape[1] + 1)[:, :-1]
        ref_logits = ref_logits.float() / (args.temperature + 1e-7)  # (b, T, vocab): one chunk at a time
        out["ref_logprobs"].append(logprobs_from_logits(ref_logits, gather_index(response, pad_token_id)))
        del ref_logits

        # Response Processing 1. truncate response after the first occurrence of `stop_token_id`
        postprocessed_response = response
        if stop_token_id is not None:
            postprocessed_response = truncate_response(stop_token_id, pad_token_id, response)

        # Response Processing 2. run reward model on the truncated responses; values on the raw ones
        postprocessed_query_response = torch.cat((query, postprocessed_response), 1)
        sequence_length = first_true_indices(postprocessed_response == pad_token_id) - 1  # L: last real token
        with autocast(device, precision):
            full_value, _, _ = get_reward(value_model, query_response, pad_token_id, context_length)
            _, score, _ = get_reward(reward_model, postprocessed_query_response, pad_token_id, context_length)
        out["postprocessed_responses"].append(postprocessed_response)
        out["sequence_lengths"].append(sequence_length)
        out["values"].append(full_value[:, context_length - 1 : -1].squeeze(-1).float())  # V before each token
        out["scores"].append(score.float())
    return {"query_responses": query_responses, "responses": query_responses[:, context_length:], "logprobs": logprobs,
            **{key: torch.cat(chunks) for key, chunks in out.items()}}


@torch.no_grad()
def compute_advantages(rollouts: dict[str, torch.Tensor], args: PPOConfig,
                       eos_token_id: int | None) -> dict[str, torch.Tensor]:
    """§5.4-§5.5 on one rank's rollouts: the missing-EOS penalty, padding masks, per-token KL rewards with the score
    at L + 1, whitening, GAE. Returns the rollouts updated and extended with what the update and the metrics read."""
    responses, sequence_lengths = rollouts["responses"], rollouts["sequence_lengths"]
    # Response Processing 3. Filter completion: responses without EOS get a lower score (EOS, not the stop token)
    contain_eos_token = torch.any(rollouts["postprocessed_responses"] == eos_token_id, dim=-1)
    scores = rollouts["scores"].clone()  # (B,)
    if args.missing_eos_penalty is not None:
        scores[~contain_eos_token] -= args.missing_eos_penalty

    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)  # (B, T)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)  # (B, T): True after L
    padding_mask_p1 = response_idxs > (sequence_lengths + 1).unsqueeze(1)  # keeps L + 1 for the value function
    logprobs = rollouts["logprobs"].masked_fill(padding_mask, INVALID_LOGPROB)
    ref_logprobs = rollouts["ref_logprobs"].masked_fill(padding_mask, INVALID_LOGPROB)
    values = rollouts["values"].masked_fill(padding_mask_p1, 0)

    # 4. compute rewards
    kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator)  # (B, T)
    rewards, non_score_reward = compute_rewards(kl, args.kl_coef, scores, sequence_lengths)
    # 5. whiten rewards
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0)
    # 6. compute advantages and returns
    advantages, returns = compute_gae(rewards, values, args.gamma, args.lam)  # returns before whitening
    advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0)
    return {**rollouts, "scores": scores, "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values,
            "padding_mask": padding_mask, "padding_mask_p1": padding_mask_p1, "kl": kl,
            "non_score_reward": non_score_reward, "rewards": rewards, "advantages": advantages, "returns": returns}


def minibatch_orders(args: PPOConfig, update: int) -> list[torch.Tensor]:
    """One permutation of the local batch per PPO epoch. TRL draws them from NumPy's global generator, which it never
    seeds; we seed a torch generator from (local_seed, update), so that runs and resumed runs repeat them."""
    seed = int(np.random.SeedSequence([args.local_seed, update]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(args.local_batch_size, generator=generator) for _ in range(args.num_ppo_epochs)]


STATS = ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")


def ppo_update(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], args: PPOConfig,
               pad_token_id: int, minibatch_orders: list[torch.Tensor],
               precision: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PPO epochs (§5.6) over `batch` from compute_advantages, with one permutation of its rows per epoch.
    `model` is a PolicyAndValue: plain, DDP-wrapped or FSDP-sharded. Returns each statistic per micro-batch, shaped
    (num_ppo_epochs, num_mini_batches, micro-batches per minibatch).

    Each minibatch of local_mini_batch_size rows is split into micro-batches of per_device_train_batch_size whose
    losses are averaged into ONE optimizer step: TRL's intended cadence, which it follows when
    gradient_accumulation_steps = 1. With GA > 1 accelerate counts micro-batches across minibatches instead (§5.7):
    with num_mini_batches > 1 TRL steps once per PPO epoch and leaves statistic slots at 0, and during the last batch
    of a dataloader epoch it steps after every micro-batch.
    """
    query_responses, responses = batch["query_responses"], batch["responses"]
    context_length = query_responses.shape[1] - responses.shape[1]
    device = query_responses.device
    micro_starts = range(0, args.local_mini_batch_size, args.per_device_train_batch_size)
    stats_shape = (len(minibatch_orders), args.num_mini_batches, len(micro_starts))
    stats = {key: torch.zeros(stats_shape, device=device) for key in STATS}
    parameters = [p for p in model.parameters() if p.requires_grad]
    for ppo_epoch_idx, b_inds in enumerate(minibatch_orders):
        for minibatch_idx, mini_batch_start in enumerate(range(0, args.local_batch_size, args.local_mini_batch_size)):
            mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + args.local_mini_batch_size]
            for gradient_accumulation_idx, micro_batch_start in enumerate(micro_starts):
                micro_batch_end = micro_batch_start + args.per_device_train_batch_size
                micro_batch_inds = mini_batch_inds[micro_batch_start:micro_batch_end]
                mb_advantage = batch["advantages"][micro_batch_inds]
                mb_responses = responses[micro_batch_inds]
                mb_query_responses = query_responses[micro_batch_inds]
                mb_logprobs = batch["logprobs"][micro_batch_inds]
                mb_return = batch["returns"][micro_batch_inds]
                mb_values = batch["values"][micro_batch_inds]
                mb_padding_mask = batch["padding_mask"][micro_batch_inds]
                mb_padding_mask_p1 = batch["padding_mask_p1"][micro_batch_inds]

                # DDP/FSDP average gradients over ranks once per minibatch, on its last micro-batch
                last = gradient_accumulation_idx == len(micro_starts) - 1
                with gradient_sync(model, last):
                    with autocast(device, precision):
                        # logits only where a response token is predicted (TRL projects every position)
                        output, vpred_temp = model(*model_inputs(mb_query_responses, pad_token_id),
                                                   logits_to_keep=responses.shape[1] + 1)
                    logits = output[:, :-1].float() / (args.temperature + 1e-7)  # (b, T, V)
                    new_logprobs = logprobs_from_logits(logits, gather_index(mb_responses, pad_token_id))
                    new_logprobs = new_logprobs.masked_fill(mb_padding_mask, INVALID_LOGPROB)
                    vpred = vpred_temp[:, context_length - 1 : -1].float().masked_fill(mb_padding_mask_p1, 0)
                    vf_loss, vf_clipfrac = ppo_value_loss(vpred, mb_values, mb_return, mb_padding_mask_p1,
                                                          args.cliprange_value)
                    pg_loss, pg_clipfrac, ratio = ppo_policy_loss(new_logprobs, mb_logprobs, mb_advantage,
                                                                  mb_padding_mask, args.cliprange)
                    loss = pg_loss + args.vf_coef * vf_loss
                    (loss / len(micro_starts)).backward()
                with torch.no_grad():
                    cell = (ppo_epoch_idx, minibatch_idx, gradient_accumulation_idx)
                    stats["approxkl"][cell] = 0.5 * ((new_logprobs - mb_logprobs) ** 2).mean()
                    stats["pg_clipfrac"][cell] = pg_clipfrac
                    stats["pg_loss"][cell] = pg_loss
                    stats["vf_loss"][cell] = vf_loss
                    stats["vf_clipfrac"][cell] = vf_clipfrac
                    stats["entropy"][cell] = entropy_from_logits(logits).mean()
                    stats["ratio"][cell] = ratio.mean()
            if args.max_grad_norm > 0:  # TRL never clips in PPO (§5.12)
                torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Metrics, sample completions


@torch.no_grad()
def update_metrics(batch: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], eos_token_id: int | None,
                   gold_scores: torch.Tensor | None = None) -> dict[str, float]:
    """TRL's per-update metrics (§5.8) over all ranks, but val/num_eos_tokens, which counts this rank's raw
    responses as TRL does; objective/gold_score (the toy task's exact score) when given."""
    mean_kl = batch["kl"].sum(1).mean()
    # TRL 1.12 masks the padding here (PR #6121); before, each INVALID_LOGPROB added -1
    mean_entropy = (-batch["logprobs"] * ~batch["padding_mask"]).sum(1).mean()
    mean_non_score_reward = batch["non_score_reward"].sum(1).mean()
    rlhf_reward = mean_non_score_reward + batch["scores"].mean()
    objective = {"kl": mean_kl, "entropy": mean_entropy, "non_score_reward": mean_non_score_reward,
                 "rlhf_reward": rlhf_reward, "scores": batch["scores"].mean()}
    if gold_scores is not None:
        objective["gold_score"] = gold_scores.to(mean_kl.device).mean()
    metrics = {f"objective/{key}": all_reduce(value).item() for key, value in objective.items()}
    for key, name in (("policy/approxkl_avg", "approxkl"), ("policy/clipfrac_avg", "pg_clipfrac"),
                      ("loss/policy_avg", "pg_loss"), ("loss/value_avg", "vf_loss"),
                      ("val/clipfrac_avg", "vf_clipfrac"), ("policy/entropy_avg", "entropy"), ("val/ratio", "ratio")):
        metrics[key] = gather(stats[name]).mean().item()
    metrics["val/ratio_var"] = gather(stats["ratio"]).var().item()
    metrics["val/num_eos_tokens"] = (batch["responses"] == eos_token_id).sum().item()
    return metrics


@torch.no_grad()
def sample_completions(policy: CausalLM, reward_model: RewardModel, tokenizer: Tokenizer, eval_dataset: list[dict],
                       args: PPOConfig, stop_token_id: int | None, precision: torch.dtype | None,
                       num_batches: int | None = None) -> list[dict]:
    """TRL's generate_completions (§5.9): near-greedy responses (temperature 0.01) to the first `num_batches` full
    eval batches (all if None), truncated at the stop token and scored by the reward model without the EOS penalty."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device).manual_seed(args.seed)  # own stream: the training RNG is left as it was
    batch_size, pad_token_id = args.per_device_eval_batch_size, tokenizer.pad_token_id
    rows = []
    with gathered_weights(policy, args.fsdp):  # FSDP: the whole policy for generating; the reward model stays sharded
        for start in range(0, len(eval_dataset) // batch_size * batch_size, batch_size)[:num_batches]:
            query = collate_prompts(eval_dataset[start : start + batch_size], pad_token_id)["input_ids"].to(device)
            context_length = query.shape[1]
            with autocast(device, precision):
                out = generate(policy, query, pad_token_id, args.response_length, temperature=0.01 + 1e-7, top_k=0,
                               top_p=1.0, stop_token_id=stop_token_id, generator=generator)
            postprocessed_response = out.query_responses[:, context_length:]
            if stop_token_id is not None:
                postprocessed_response = truncate_response(stop_token_id, pad_token_id, postprocessed_response)
            with autocast(device, precision):
                _, score, _ = get_reward(reward_model, torch.cat((query, postprocessed_response), 1), pad_token_id,
                                         context_length)
            queries = tokenizer.batch_decode(query.tolist(), skip_special_tokens=True)
            responses = tokenizer.batch_decode(postprocessed_response.tolist())  # special tokens kept, as TRL
            rows += [{"query": q, "response": r, "score": s}
                     for q, r, s in zip(queries, responses, score.float().tolist(), strict=True)]
    if args.toytask_gold_score:
        for row in rows:
            row["gold_score"] = toytask.gold_score(row["query"], row["response"])
    return rows


def log_completions(rows: list[dict], step: int, output_dir: str) -> None:
    """Append rows to output_dir/completions.jsonl; print their mean scores and the first five (TRL prints those)."""
    if not rows:
        return
    with open(Path(output_dir) / "completions.jsonl", "a") as f:
        f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
    means = {key: round(sum(row[key] for row in rows) / len(rows), 4) for key in rows[0] if "score" in key}
    print0(f"[minirlhf] update {step}: completions of {len(rows)} eval prompts, mean {means}")
    for row in rows[:5]:
        gold = f" gold {row['gold_score']:.2f}" if "gold_score" in row else ""
        print0(f"  score {row['score']:+.3f}{gold} | {row['query']!r} -> {row['response']!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Training


def load(args: PPOConfig, ddp) -> tuple:
    """Tokenizer, prompts and the four models, as TRL's examples/scripts/ppo/ppo.py builds them."""
    require(args.dataset_name is not None, "dataset_name", "is required (a prompt file or folder, or a Hub id)")
    tokenizer = Tokenizer.from_pretrained(args.model_name_or_path or args.sft_model_path, revision=args.model_revision)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # TRL's example always adds "[PAD]" without resizing the embeddings (pads read id 0 in every forward, §5.12);
        # we add it only when needed: a pad equal to EOS would mask every EOS out of the losses.
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.padding_side = "left"
    require(args.stop_token != "eos" or tokenizer.eos_token is not None, "stop_token", "the tokenizer has no EOS")

    def prompts(split: str) -> list[dict]:
        return prepare_prompt_dataset(load_rows(args.dataset_name, split), tokenizer, f"{args.dataset_name} [{split}]")

    train_dataset = prompts(args.dataset_train_split)
    # eval prompts only feed the sample completions; a data file has one split, so its rows serve both
    eval_dataset = prompts(args.dataset_test_split) if args.num_sample_generations > 0 else []
    args.set_runtime_sizes(ddp.world_size, len(train_dataset), ddp.rank)
    if len(train_dataset) < args.batch_size:
        raise ValueError(f"{args.dataset_name}: {len(train_dataset)} prompts, fewer than one batch of "
                         f"{args.batch_size} (per_device_train_batch_size * gradient_accumulation_steps * ranks)")

    # value and reward model from the reward model, policy and reference from the SFT model
    load_kwargs = dict(dtype=args.dtype, device=ddp.device)
    value_model = RewardModel.from_pretrained(args.reward_model_path, **load_kwargs)
    reward_model = RewardModel.from_pretrained(args.reward_model_path, **load_kwargs).eval().requires_grad_(False)
    policy = CausalLM.from_pretrained(args.sft_model_path, **load_kwargs)
    ref_policy = CausalLM.from_pretrained(args.sft_model_path, **load_kwargs).eval().requires_grad_(False)
    if reward_model.cfg.vocab_size != policy.cfg.vocab_size:  # policy ids go straight in (huggingface/trl#1674)
        raise ValueError(f"reward_model_path: vocabulary of {reward_model.cfg.vocab_size} tokens, but sft_model_path "
                         f"has {policy.cfg.vocab_size}; PPO needs one tokenizer for all models")
    for m in (policy, ref_policy, value_model, reward_model):
        disable_dropout(m)
    for m in (policy, value_model):
        m.transformer.gradient_checkpointing = args.gradient_checkpointing  # TRL never applies it (§5.12)
    return tokenizer, train_dataset, eval_dataset, policy, ref_policy, value_model, reward_model


def main(argv: list[str] | None = None) -> None:
    args = parse_config_or_exit(PPOConfig, argv)
    ddp = init_distributed()
    device, precision = ddp.device, resolve_precision(args.bf16, args.fp16, ddp.device)
    seed_everything(args.seed)
    with exit_on_bad_input():
        require_torchrun_for_fsdp(args.fsdp)
        tokenizer, train_dataset, eval_dataset, policy, ref_policy, value_model, reward_model = load(args, ddp)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    pad_token_id, eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    stop_token_id = eos_token_id if args.stop_token == "eos" else args.stop_token_id
    if resume is not None:  # loaded over the starting models, so any new score head drew the same random numbers
        policy.load_state_dict(CausalLM.from_pretrained(str(resume), device=device, dtype=args.dtype).state_dict())
        value_model.load_state_dict(RewardModel.from_pretrained(str(resume / "value_model"), device=device,
                                                                dtype=args.dtype).state_dict())
    if args.fsdp:  # all four, in place; the optimizer is built on the shards
        for m in (policy, value_model, ref_policy, reward_model):
            shard_model(m, args.fsdp)
    model = PolicyAndValue(policy, value_model).train()
    optimizer = AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate,
                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    train_model = DDP(model) if ddp.world_size > 1 and not args.fsdp else model
    torch.manual_seed(args.local_seed)  # TRL: each rank samples from its own seed
    state = load_checkpoint(resume, optimizer, ddp.rank) if resume is not None else {"global_step": 0}

    # LR schedule stepped once per update; warmup counts updates (TRL: num_training_steps = num_total_batches)
    warmup = warmup_steps_from(args.warmup_steps, args.num_total_batches)
    lr_kwargs = schedule_kwargs(args.lr_scheduler_type, args.lr_scheduler_kwargs)
    save_steps = steps_from(args.save_steps, args.num_total_batches)
    if ddp.is_main:
        save_config(args, Path(args.output_dir) / "config.toml")
    logger = MetricsLogger(args.output_dir, args.report_to, ddp.is_main, args.num_total_batches, args.disable_tqdm)
    logger.update(state["global_step"])
    start_update, start_time = state["global_step"], time.time()
    seed = args.seed if args.data_seed is None else args.data_seed  # TRL's PPO has no data_seed
    batches = prompt_batches(train_dataset, args.local_batch_size, pad_token_id, seed, ddp.rank, ddp.world_size,
                             start=start_update)
    for update in range(start_update + 1, args.num_total_batches + 1):
        episode = update * args.batch_size
        lr = args.learning_rate * lr_multiplier(update - 1, args.num_total_batches, warmup, args.lr_scheduler_type,
                                                **lr_kwargs)
        set_lr(optimizer, lr)
        queries = next(batches).to(device)  # (local_batch_size, context_length)

        # 1. rollouts, rewards, advantages (no grad); 2. PPO epochs
        query_responses, logprobs = sample_responses(policy, queries, args, pad_token_id, stop_token_id, precision)
        rollouts = score_responses(ref_policy, value_model, reward_model, queries, query_responses, logprobs, args,
                                   pad_token_id, stop_token_id, precision)
        batch = compute_advantages(rollouts, args, eos_token_id)
        stats = ppo_update(train_model, optimizer, batch, args, pad_token_id, minibatch_orders(args, update),
                           precision)

        # 3. log, save, sample
        gold = None
        if args.toytask_gold_score:
            gold = toytask.gold_scores(tokenizer, queries, batch["postprocessed_responses"])
        eps = int((update - start_update) * args.batch_size / (time.time() - start_time))
        logger.log({"eps": eps, **update_metrics(batch, stats, eos_token_id, gold), "lr": lr, "episode": episode,
                    "epoch": episode / len(train_dataset), "step": update})
        logger.update()
        if args.save_strategy == "steps" and (update % save_steps == 0 or update == args.num_total_batches):
            save_checkpoint(args.output_dir, update, {"": policy, "value_model": value_model}, tokenizer, optimizer,
                            {"global_step": update, "episode": episode}, config_to_toml(args), ddp.rank,
                            args.save_total_limit)
        # rank 0 samples alone; sharded models need every rank, which then all compute the same completions
        if (ddp.is_main or args.fsdp) and eval_dataset and (update - 1) % args.sample_generations_freq == 0:
            rows = sample_completions(policy, reward_model, tokenizer, eval_dataset, args, stop_token_id, precision, 1)
            if ddp.is_main:
                log_completions(rows, update, args.output_dir)

    # ---- the policy (TRL's save_model), the value model (TRL drops it) and final completions (TRL ppo.py)
    logger.close()
    weights = [full_model_state(m) for m in (policy, value_model)]  # collectives when FSDP-sharded
    if ddp.is_main:
        policy.save_pretrained(args.output_dir, state_dict=weights[0])
        tokenizer.save_pretrained(args.output_dir)
        value_model.save_pretrained(str(Path(args.output_dir) / "value_model"), state_dict=weights[1])
    if (ddp.is_main or args.fsdp) and eval_dataset:
        rows = sample_completions(policy, reward_model, tokenizer, eval_dataset, args, stop_token_id, precision)
        if ddp.is_main:
            log_completions(rows, args.num_total_batches, args.output_dir)
    cleanup_distributed()


if __name__ == "__main__":
    main()
