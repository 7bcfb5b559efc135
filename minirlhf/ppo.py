"""PPO for RLHF: TRL's PPOTrainer (trl.experimental.ppo, last shipped in TRL 1.12) as one flat loop.

References: Schulman et al. 2017 (PPO); Ziegler et al. 2019 and Ouyang et al. 2022 (RLHF with a KL penalty);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"; TRL trl/experimental/ppo/ppo_config.py and
ppo_trainer.py (`PPOTrainer.train`, whose step comments "Response Processing 1-3" and "4.-6." are kept here).

Run: `python -m minirlhf.ppo configs/ppo.toml [--key value ...]`, or under `torchrun -m` for several ranks;
`--help` lists every key.

PPOConfig keeps TRL's names and defaults. TRL keys left out, accepted only at TRL's default (see --help):
`dataset_num_proc` (prompts are tokenized in the main process), `push_to_hub`, the PEFT adapter names
`model_adapter_name` / `ref_adapter_name`, and `ds3_gather_for_generation` (DeepSpeed ZeRO-3 only).

Outputs in `output_dir`: the policy (Hugging Face causal-LM layout, with the tokenizer), the value model ("gae"
only) in `value_model/` (sequence-classification layout), `checkpoint-<update>/` folders, `metrics.jsonl` (TRL's
keys, one line per update), `completions.jsonl` (sample completions on the eval prompts) and `config.toml`.
Critic-free estimators, reward functions: minirlhf/advantages.py and docs/estimators.md.

Departures from TRL, each marked at its line: one optimizer step per minibatch whatever the gradient accumulation
(TRL's accelerate cadence differs when GA > 1, see `ppo_update`); gradient checkpointing, bf16/fp16 autocast and
`max_grad_norm` clipping are applied (TRL ignores them); minibatch permutations come from a seeded torch generator
(TRL: unseeded NumPy); no (B, T, vocab) logits are made: behaviour logprobs are gathered during generation, the
others computed from the hidden states a chunk of tokens at a time (losses.chunked_logprobs, the same numbers); the
value model is saved and a run resumes exactly from a checkpoint (TRL can do neither); sample completions run on
rank 0 with their own generator. PPO logs every update: the logging and evaluation keys are refused.

Several ranks: DDP by default; `fsdp = "full_shard"` shards all four models with FSDP2 (TRL's PPO has DeepSpeed
ZeRO-3 instead). Sampling gathers the whole policy on each rank first, as TRL's ds3_gather_for_generation does.
What `main` calls from minirlhf/infra (config, loading, run lifecycle, checkpoints, several ranks, LoRA, text scores)
can be skipped on a first reading: the algorithm is here, in rollout.py, advantages.py and losses.py.
"""

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from minirlhf.advantages import ESTIMATORS, compute_advantages, policy_loss
from minirlhf.data import prompt_batches
from minirlhf.infra.completions import Stopwatch, add_text_scores, log_sample_completions
from minirlhf.infra.config import TrainingConfig, exit_on_bad_input, import_function, require
from minirlhf.infra.lora import LoraArgs, adapters_disabled
from minirlhf.infra.metrics import MetricsLogger, keep_records_up_to
from minirlhf.infra.parallel import all_reduce, cleanup_distributed, gather, gathered_weights, gradient_sync, print0
from minirlhf.infra.ppo_setup import load
from minirlhf.infra.run import (
    autocast,
    check_finite,
    check_update,
    checkpoint_or_stop,
    prepare,
    save_final,
    scheduled_lr,
    start,
)
from minirlhf.losses import INVALID_LOGPROB, KL_ESTIMATORS, gather_index, ppo_value_loss
from minirlhf.model import PolicyAndValue, model_inputs
from minirlhf.optim import AdamW, set_lr, steps_from
from minirlhf.rollout import sample_responses, score_responses


@dataclass
class PPOConfig(LoraArgs, TrainingConfig):
    """PPO (TRL experimental PPOConfig: TrainingArguments + TRL's defaults + the fields below)."""

    trl_defaults_only: ClassVar[dict[str, object]] = {
        "dataset_num_proc": None, "push_to_hub": False, "model_adapter_name": None, "ref_adapter_name": None,
        "ds3_gather_for_generation": True,
    }
    # TRL's PPO ignores these silently; minirlhf refuses them unless left at the default
    unused: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("logging_strategy", "logging_steps", "logging_first_step"), "PPO logs every update, as TRL"),
        **dict.fromkeys(("eval_strategy", "eval_steps"), "PPO has no evaluation loop; see num_sample_generations"),
        "dataloader_drop_last": "PPO always drops the incomplete last batch of prompts, as TRL",
        "max_steps": "PPO's length is total_episodes (or num_train_epochs)",
    }

    # ---- models
    learning_rate: float = 3e-6
    """peak AdamW learning rate, shared by the policy and the value model (TRL PPOConfig's default)"""
    sft_model_path: str = "EleutherAI/pythia-160m"
    """the policy's starting point (an SFT causal LM); also the frozen reference policy"""
    reward_model_path: str | None = "EleutherAI/pythia-160m"
    """sequence-classification model that scores responses; also initialises the value model. None: reward_funcs
    alone score the responses"""
    value_model_path: str | None = None
    """minirlhf: where the value model starts; None: from reward_model_path, or sft_model_path without one"""

    # ---- rollouts
    total_episodes: int | None = None
    """prompts to train on in total; None: int(num_train_epochs * len(train dataset))"""
    num_mini_batches: int = 1
    """minibatches each batch of rollouts is split into, one optimizer step each"""
    num_ppo_epochs: int = 4
    """passes of PPO optimisation over each batch of rollouts"""
    local_rollout_forward_batch_size: int = 64
    """sequences per rank per no-grad forward (generation, reference, value and reward)"""
    padding_free: bool = True
    """minirlhf: forwards skip left pads and pads after the stop (infra/packing.py), with the same results"""
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
    advantage_estimator: str = "gae"
    """minirlhf: "gae" (TRL's PPO, with a value model), or critic-free: "rloo" (TRL's RLOOTrainer), "grpo" (TRL's
    GRPOTrainer), "reinforce_pp" (REINFORCE++); see minirlhf/advantages.py"""
    num_generations: int = 1
    """samples per prompt (TRL GRPO/RLOO's name): each batch of rollouts holds local_batch_size / k prompts k times;
    "rloo" and "grpo" need >= 2"""
    reward_funcs: list[str] | None = None
    """TRL GRPO/RLOO's reward functions as "package.module:function" (f(prompts=..., completions=...) -> floats),
    weighted and added to the reward model's score (or alone, without reward_model_path)"""
    reward_weights: list[float] | None = None
    """one weight per reward function (TRL's name); None: all 1.0"""
    metric_funcs: list[str] | None = None
    """minirlhf: "package.module:function" text functions (TRL's reward-function arguments) whose mean score is logged
    as objective/<function>, e.g. ["minirlhf.infra.toytask:gold_score"]; they do not enter the reward"""

    # ---- filled at runtime by set_runtime_sizes (PPOTrainer.__init__ in TRL); cannot be set in a config
    local_batch_size: int | None = field(default=None, init=False)
    """rollouts per rank per PPO update: HF's per_device_train_batch_size * gradient_accumulation_steps"""
    batch_size: int | None = field(default=None, init=False)
    """rollouts per PPO update over all ranks: local_batch_size * world_size"""
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
        require(self.kl_estimator in KL_ESTIMATORS, "kl_estimator",
                f"{self.kl_estimator!r} is not one of {KL_ESTIMATORS}")
        for spec in self.metric_funcs or []:
            import_function(spec, "metric_funcs")
        names = [import_function(spec, "reward_funcs").__name__ for spec in self.reward_funcs or []]
        require(len(set(names)) == len(names), "reward_funcs", f"two functions share a name: {names}")
        require(self.reward_weights is None or len(self.reward_weights) == len(names), "reward_weights",
                f"{len(self.reward_weights or [])} weights for {len(names)} reward_funcs")
        require(self.reward_model_path is not None or names, "reward_model_path",
                "is none and there are no reward_funcs: nothing scores the responses")
        require(self.advantage_estimator in ESTIMATORS, "advantage_estimator",
                f"{self.advantage_estimator!r} is not one of {', '.join(ESTIMATORS)}")
        least = 2 if self.advantage_estimator in ("rloo", "grpo") else 1  # a group baseline needs two samples
        require(self.num_generations >= least, "num_generations", f"must be >= {least}, got {self.num_generations}")
        require(self.value_model_path is None or self.advantage_estimator == "gae", "value_model_path",
                f"advantage_estimator {self.advantage_estimator!r} has no value model")
        require(self.save_strategy != "epoch", "save_strategy", "PPO saves every save_steps updates ('steps') or 'no'")

    def set_runtime_sizes(self, world_size: int, train_dataset_len: int, rank: int = 0) -> None:
        """Fill the runtime block from the number of ranks and prompts, as TRL's PPOTrainer.__init__ does."""
        if self.total_episodes is None:  # episodes given in epochs; an episode is a rollout, k per prompt
            self.total_episodes = int(self.num_train_epochs * train_dataset_len * self.num_generations)
        self.local_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.batch_size = self.local_batch_size * world_size
        require(self.local_batch_size % self.num_generations == 0, "num_generations",
                f"local_batch_size = {self.local_batch_size} is not a multiple of num_generations = "
                f"{self.num_generations}")
        for of in ("batch_size", "local_batch_size"):  # TRL checks both (its mini_batch_size is unused here)
            size = getattr(self, of)
            require(size % self.num_mini_batches == 0, "num_mini_batches",
                    f"{of} = {size} is not a multiple of num_mini_batches = {self.num_mini_batches}")
        self.local_mini_batch_size = self.local_batch_size // self.num_mini_batches
        require(not self.whiten_rewards or self.local_mini_batch_size >= 8, "whiten_rewards",
                f"needs local_mini_batch_size >= 8 for whitening, got {self.local_mini_batch_size}")
        self.num_total_batches = math.ceil(self.total_episodes / self.batch_size)
        if self.num_sample_generations > 0:
            self.sample_generations_freq = max(1, self.num_total_batches // self.num_sample_generations)
        self.local_seed = self.seed + rank * 100003  # TRL: a prime offset per rank


def main(argv: list[str] | None = None) -> None:
    run = start(PPOConfig, argv)
    args, device, rank = run.args, run.dist.device, run.dist.rank
    with exit_on_bad_input():
        setup = load(args, run)  # tokenizer, prompts, the four models, reward and metric functions
    tokenizer, policy, ref_policy, value_model = setup.tokenizer, setup.policy, setup.ref_policy, setup.value_model
    reward_model_on_ids = setup.reward_model if setup.reward_tokenizer is None else None  # else: it reads the texts
    pad_token_id, eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    stop_token_id = eos_token_id if args.stop_token == "eos" else args.stop_token_id
    torch.manual_seed(args.local_seed)  # TRL: each rank samples from its own seed
    model = PolicyAndValue(policy, value_model).train()  # one optimizer, one DDP wrapper for both (TRL's wrapper)
    saved = {"": policy, **({"value_model": value_model} if value_model is not None else {})}
    train_model, optimizer, state = prepare(run, model, tokenizer, {"step": 0}, saved, sharded=tuple(
        m for m in (policy, value_model, ref_policy, setup.reward_model) if m is not None))
    save_steps = steps_from(args.save_steps, args.num_total_batches)
    print0(f"[minirlhf] {args.num_total_batches} updates of {args.batch_size} rollouts ({args.local_batch_size} per "
           f"rank), {args.num_mini_batches} minibatches of {args.local_mini_batch_size} per rank, micro-batches of "
           f"{args.per_device_train_batch_size}")
    logger = MetricsLogger(args, run.dist.is_main, args.num_total_batches, state["step"])
    if run.dist.is_main:
        keep_records_up_to(Path(args.output_dir) / "completions.jsonl", state["step"])
    start_update, start_time = state["step"], time.time()
    seed = args.seed if args.data_seed is None else args.data_seed  # TRL's PPO has no data_seed
    k = args.num_generations  # each prompt is sampled k times: local_batch_size / k prompts per update
    batches = prompt_batches(setup.train_dataset, args.local_batch_size // k, pad_token_id, seed, rank,
                             run.dist.world_size, start=start_update)

    for update in range(start_update + 1, args.num_total_batches + 1):
        episode = update * args.batch_size
        # the schedule steps once per update: warmup counts updates (TRL: num_training_steps = num_total_batches)
        lr = scheduled_lr(args, update - 1, args.num_total_batches)
        set_lr(optimizer, lr)
        queries = next(batches).to(device).repeat_interleave(k, 0)  # (local_batch_size, context_length)

        # rollouts (no grad): sampling, then Response Processing 1-2 (reference logprobs, values, scores)
        clock = Stopwatch(device)
        with autocast(device, run.precision), gathered_weights(policy, args.fsdp):  # FSDP: the whole policy, once
            query_responses, logprobs = sample_responses(policy, queries, args, pad_token_id, stop_token_id)
        clock.lap("generation")
        with autocast(device, run.precision), adapters_disabled(policy):  # LoRA: the reference is the base policy
            rollouts = score_responses(ref_policy or policy, value_model, reward_model_on_ids, queries,
                                       query_responses, logprobs, args, pad_token_id, stop_token_id)
        # the texts' scores: reward functions enter the score with their weights, metric functions are only logged
        text_scores = add_text_scores(rollouts, setup, queries, run.precision)
        clock.lap("scoring")
        # Response Processing 3 (EOS penalty), 4. compute rewards, 5. whiten rewards, 6. advantages and returns
        batch = compute_advantages(rollouts, args, eos_token_id)
        # PPO epochs over minibatches, one optimizer step each (or none where on_nonfinite stops or skips it)
        guard = functools.partial(check_finite, run)
        stats = ppo_update(train_model, optimizer, batch, args, pad_token_id, minibatch_orders(args, update),
                           run.precision, guard, update)
        clock.lap("update")

        # log every update, sample completions every sample_generations_freq updates, save on save_steps
        eps = int((update - start_update) * args.batch_size / (time.time() - start_time))
        logger.log({"eps": eps, **update_metrics(batch, stats, eos_token_id, text_scores), **clock.metrics(batch),
                    "lr": lr, **run.skipped_steps(), "episode": episode,
                    "epoch": episode / (k * len(setup.train_dataset)), "step": update})
        logger.update()
        check_update(run, update, model)  # nan/inf weights stop the run, before anything of them is saved
        if args.sample_generations_freq and (update - 1) % args.sample_generations_freq == 0:
            log_sample_completions(setup, args, run, update, num_batches=1)
        scheduled = args.save_strategy == "steps" and (update % save_steps == 0 or update == args.num_total_batches)
        checkpoint_or_stop(run, update, scheduled, {"step": update, "episode": episode}, logger)

    # final completions (TRL's ppo.py), then the policy (TRL's save_model) and the value model (TRL drops it)
    logger.close()
    log_sample_completions(setup, args, run, args.num_total_batches)
    save_final(run, args.sft_model_path)
    cleanup_distributed()


# ---------------------------------------------------------------------------------------------------------------------
# The steps of one update, in the order they run


def minibatch_orders(args: PPOConfig, update: int) -> list[torch.Tensor]:
    """One permutation of the local batch per PPO epoch. TRL draws them from NumPy's global generator, which it never
    seeds; we seed a torch generator from (local_seed, update), so that runs and resumed runs repeat them."""
    seed = int(np.random.SeedSequence([args.local_seed, update]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(args.local_batch_size, generator=generator) for _ in range(args.num_ppo_epochs)]


STATS = ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
UPDATE_KEYS = ("responses", "query_responses", "advantages", "logprobs", "ref_logprobs", "padding_mask",
               "returns", "values", "padding_mask_p1")  # what the update reads of a batch; the last three: "gae" only


def ppo_update(model: nn.Module, optimizer: AdamW, batch: dict[str, torch.Tensor], args: PPOConfig,
               pad_token_id: int, epoch_orders: list[torch.Tensor], precision: torch.dtype | None = None,
               guard=None, update: int = 0) -> dict[str, torch.Tensor]:
    """PPO epochs (TRL: "Do multiple epochs of PPO training, with a fresh random shuffle in each epoch") over `batch`
    from compute_advantages, with one permutation of its rows per epoch.
    `model` is a PolicyAndValue: plain, DDP-wrapped or FSDP-sharded. Returns each statistic per micro-batch, shaped
    (num_ppo_epochs, num_mini_batches, micro-batches per minibatch).

    Each minibatch of local_mini_batch_size rows is split into micro-batches of per_device_train_batch_size whose
    losses are averaged into ONE optimizer step: TRL's intended cadence, which it follows when
    gradient_accumulation_steps = 1. With GA > 1 accelerate counts micro-batches across minibatches instead:
    with num_mini_batches > 1 TRL steps once per PPO epoch and leaves statistic slots at 0, and during the last batch
    of a dataloader epoch it steps after every micro-batch.
    `guard(where, values)` (main's check_finite; None: step regardless) decides whether a minibatch whose loss or
    gradient norm is nan/inf on any rank is stepped: it stops the run, or under on_nonfinite = "skip" returns False
    (AdamW's state untouched); `update` names the update in its message.
    """
    responses = batch["responses"]
    device = responses.device
    micro_starts = range(0, args.local_mini_batch_size, args.per_device_train_batch_size)
    stats_shape = (len(epoch_orders), args.num_mini_batches, len(micro_starts))
    stats = {key: torch.zeros(stats_shape, device=device) for key in STATS}
    critic = "values" in batch  # only "gae" has a value model
    keys = [key for key in UPDATE_KEYS if key in batch]
    for ppo_epoch_idx, b_inds in enumerate(epoch_orders):
        for minibatch_idx, mini_batch_start in enumerate(range(0, args.local_batch_size, args.local_mini_batch_size)):
            mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + args.local_mini_batch_size]
            for gradient_accumulation_idx, micro_batch_start in enumerate(micro_starts):
                micro_batch_end = micro_batch_start + args.per_device_train_batch_size
                micro_batch_inds = mini_batch_inds[micro_batch_start:micro_batch_end]
                mb = {key: batch[key][micro_batch_inds] for key in keys}
                mb_responses, mb_query_responses = mb["responses"], mb["query_responses"]
                cell = (ppo_epoch_idx, minibatch_idx, gradient_accumulation_idx)

                # DDP/FSDP average gradients over ranks once per minibatch, on its last micro-batch
                with gradient_sync(model, gradient_accumulation_idx == len(micro_starts) - 1):
                    with autocast(device, precision):
                        # log-probs, entropies and values only where a response token is predicted (TRL: logits at
                        # every position, / temperature, log-softmax); no (b, T, vocab) logits are made
                        new_logprobs, entropy, vpred = model(*model_inputs(mb_query_responses, pad_token_id),
                                                             targets=gather_index(mb_responses, pad_token_id),
                                                             temperature=args.temperature + 1e-7)  # (b, T) each
                    new_logprobs = new_logprobs.masked_fill(mb["padding_mask"], INVALID_LOGPROB)
                    pg_loss, pg_clipfrac, ratio = policy_loss(new_logprobs, mb, args)
                    loss = pg_loss
                    if critic:  # "gae": the value model learns beside the policy
                        vpred = vpred.float().masked_fill(mb["padding_mask_p1"], 0)  # (b, T)
                        vf_loss, vf_clipfrac = ppo_value_loss(vpred, mb["values"], mb["returns"],
                                                              mb["padding_mask_p1"], args.cliprange_value)
                        loss = pg_loss + args.vf_coef * vf_loss
                        stats["vf_loss"][cell], stats["vf_clipfrac"][cell] = vf_loss.detach(), vf_clipfrac
                    (loss / len(micro_starts)).backward()
                with torch.no_grad():
                    # approxkl = 0.5 * E[(log ratio)^2] (Schulman 2020's k2; TRL ppo_trainer.py)
                    stats["approxkl"][cell] = 0.5 * ((new_logprobs - mb["logprobs"]) ** 2).mean()
                    stats["pg_clipfrac"][cell] = pg_clipfrac
                    stats["pg_loss"][cell] = pg_loss
                    stats["entropy"][cell] = entropy.mean()  # over every position, pads too, as TRL
                    stats["ratio"][cell] = ratio.mean()
            # TRL never clips in PPO; max_grad_norm = 0 leaves the gradients as they are but takes their norm
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm) if args.max_grad_norm
                         else torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            losses = {k: stats[k][ppo_epoch_idx, minibatch_idx].sum() for k in ("pg_loss", "vf_loss")}
            where = f"{update} (PPO epoch {ppo_epoch_idx + 1}, minibatch {minibatch_idx + 1})"
            if guard is None or guard(where, {**losses, "grad_norm": grad_norm}):
                optimizer.step()
            optimizer.zero_grad()
    return stats if critic else {key: value for key, value in stats.items() if not key.startswith("vf_")}


@torch.no_grad()
def update_metrics(batch: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], eos_token_id: int | None,
                   text_scores: dict[str, list[float]] | None = None) -> dict[str, float]:
    """TRL's per-update metrics (`PPOTrainer.train`, after the PPO epochs) over all ranks, but val/num_eos_tokens,
    which counts this rank's raw responses as TRL does; objective/<name> for each metric function's scores."""
    mean_kl = batch["kl"].sum(1).mean()
    # TRL 1.12 masks the padding here (PR #6121); before, each INVALID_LOGPROB added -1
    mean_entropy = (-batch["logprobs"] * ~batch["padding_mask"]).sum(1).mean()
    mean_non_score_reward = batch["non_score_reward"].sum(1).mean()
    rlhf_reward = mean_non_score_reward + batch["scores"].mean()
    objective = {"kl": mean_kl, "entropy": mean_entropy, "non_score_reward": mean_non_score_reward,
                 "rlhf_reward": rlhf_reward, "scores": batch["scores"].mean()}
    for name, values in (text_scores or {}).items():
        objective[name] = torch.tensor(values, device=mean_kl.device).mean()
    metrics = {f"objective/{key}": all_reduce(value).item() for key, value in objective.items()}
    for key, name in (("policy/approxkl_avg", "approxkl"), ("policy/clipfrac_avg", "pg_clipfrac"),
                      ("loss/policy_avg", "pg_loss"), ("loss/value_avg", "vf_loss"),
                      ("val/clipfrac_avg", "vf_clipfrac"), ("policy/entropy_avg", "entropy"), ("val/ratio", "ratio")):
        if name in stats:  # no value statistics without a value model
            metrics[key] = gather(stats[name]).mean().item()
    metrics["val/ratio_var"] = gather(stats["ratio"]).var().item()
    metrics["val/num_eos_tokens"] = (batch["responses"] == eos_token_id).sum().item()
    return metrics


if __name__ == "__main__":
    main()
