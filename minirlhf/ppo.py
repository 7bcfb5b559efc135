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
Critic-free estimators, reward functions: minirlhf/advantages.py and the README.

Departures from TRL, each marked at its line: one optimizer step per minibatch whatever the gradient accumulation
(TRL's accelerate cadence differs when GA > 1, see `ppo_update`); gradient checkpointing, bf16/fp16 autocast and
`max_grad_norm` clipping are applied (TRL ignores them); minibatch permutations come from a seeded torch generator
(TRL: unseeded NumPy); behaviour logprobs are gathered during generation, so no (B, T, vocab) logits are kept; the
value model is saved and a run resumes exactly from a checkpoint (TRL can do neither); sample completions run on
rank 0 with their own generator. PPO logs every update: the logging and evaluation keys are refused.

Several ranks: DDP by default; `fsdp = "full_shard"` shards all four models with FSDP2 (TRL's PPO has DeepSpeed
ZeRO-3 instead). Sampling gathers the whole policy on each rank first, as TRL's ds3_gather_for_generation does;
the sharded reward model scores sample completions with every rank taking part, so every rank computes them.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from minirlhf.advantages import ESTIMATORS, compute_advantages, policy_loss
from minirlhf.common import MetricsLogger, all_reduce, autocast, cleanup_distributed, gather, keep_records_up_to
from minirlhf.config import TrainingConfig, exit_on_bad_input, import_function, require
from minirlhf.data import prompt_batches
from minirlhf.lora import adapters_disabled, check_lora, merged, save_adapter
from minirlhf.losses import INVALID_LOGPROB, entropy_from_logits, logprobs_from_logits, ppo_value_loss
from minirlhf.model import PolicyAndValue, gather_index, model_inputs
from minirlhf.optim import set_lr, steps_from
from minirlhf.packing import rollout_packing
from minirlhf.parallel import gradient_sync
from minirlhf.rlsetup import load
from minirlhf.rollout import (
    Stopwatch,
    log_completions,
    reward_model_scores,
    sample_completions,
    sample_responses,
    score_responses,
    text_scores,
    weighted_sum,
)
from minirlhf.training import Run, check_finite, check_update, prepare, save, save_final, scheduled_lr, start, stop_now


@dataclass
class PPOConfig(TrainingConfig):
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
    """minirlhf: forwards of query + response skip left pads and pads after the stop (packing.py); same results"""
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
    use_peft: bool = False
    """TRL ModelConfig: train LoRA adapters on the policy (minirlhf/lora.py); the reference is the policy with its
    adapters off. Saves the adapter (PEFT layout) and the merged model in merged/; checkpoints hold the adapter"""
    lora_r: int = 16
    """LoRA rank (TRL's default)"""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is (lora_alpha / lora_r) B A (TRL's default)"""
    lora_dropout: float = 0.05
    """dropout on the adapters' input (TRL's default)"""
    lora_target_modules: list[str] | None = None
    """Linear layers to adapt, by name; None: ["q_proj", "v_proj"], PEFT's choice for Llama-like models"""
    metric_funcs: list[str] | None = None
    """minirlhf: "package.module:function" text functions (TRL's reward-function arguments) whose mean score is logged
    as objective/<function>, e.g. ["minirlhf.toytask:gold_score"]; they do not enter the reward"""

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
        check_lora(self)
        require(self.value_model_path is None or self.advantage_estimator == "gae", "value_model_path",
                f"advantage_estimator {self.advantage_estimator!r} has no value model")
        require(self.save_strategy != "epoch", "save_strategy", "PPO saves every save_steps updates ('steps') or 'no'")

    def set_runtime_sizes(self, world_size: int, train_dataset_len: int, rank: int = 0) -> None:
        """Fill the runtime block from the number of ranks and prompts, as TRL's PPOTrainer.__init__ does."""
        if self.total_episodes is None:  # episodes given in epochs; an episode is a rollout, k per prompt
            self.total_episodes = int(self.num_train_epochs * train_dataset_len * self.num_generations)
        self.world_size = world_size
        self.local_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.micro_batch_size = self.per_device_train_batch_size * world_size
        self.batch_size = self.local_batch_size * world_size
        require(self.local_batch_size % self.num_generations == 0, "num_generations",
                f"local_batch_size = {self.local_batch_size} is not a multiple of num_generations = "
                f"{self.num_generations}")
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


def main(argv: list[str] | None = None) -> None:
    run = start(PPOConfig, argv)
    args, device, rank = run.args, run.dist.device, run.dist.rank
    with exit_on_bad_input():
        tokenizer, train_dataset, eval_dataset, policy, ref_policy, value_model, reward_model, reward_tokenizer, \
            conversations = load(args, run)
    scoring = dict(reward_tokenizer=reward_tokenizer, conversations=conversations)  # how texts are scored
    pad_token_id, eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    stop_token_id = eos_token_id if args.stop_token == "eos" else args.stop_token_id
    metric_funcs = {spec.rpartition(":")[2]: import_function(spec, "metric_funcs") for spec in args.metric_funcs or []}
    reward_funcs = {spec.rpartition(":")[2]: import_function(spec, "reward_funcs") for spec in args.reward_funcs or []}
    reward_weights = dict(zip(reward_funcs, args.reward_weights or [1.0] * len(reward_funcs), strict=True))
    torch.manual_seed(args.local_seed)  # TRL: each rank samples from its own seed
    model = PolicyAndValue(policy, value_model).train()  # one optimizer, one DDP wrapper for both (TRL's wrapper)
    saved = {"": policy, **({"value_model": value_model} if value_model is not None else {})}
    train_model, optimizer, state = prepare(run, model, saved, sharded=tuple(
        m for m in (policy, value_model, ref_policy, reward_model) if m is not None))
    state = state or {"step": 0}
    save_steps = steps_from(args.save_steps, args.num_total_batches)
    logger = MetricsLogger(args, run.dist.is_main, args.num_total_batches, state["step"])
    if run.dist.is_main:
        keep_records_up_to(Path(args.output_dir) / "completions.jsonl", state["step"])
    start_update, start_time = state["step"], time.time()
    seed = args.seed if args.data_seed is None else args.data_seed  # TRL's PPO has no data_seed
    k = args.num_generations  # each prompt is sampled k times: local_batch_size / k prompts per update
    batches = prompt_batches(train_dataset, args.local_batch_size // k, pad_token_id, seed, rank, run.dist.world_size,
                             start=start_update)

    for update in range(start_update + 1, args.num_total_batches + 1):
        episode = update * args.batch_size
        # the schedule steps once per update: warmup counts updates (TRL: num_training_steps = num_total_batches)
        lr = scheduled_lr(args, update - 1, args.num_total_batches)
        set_lr(optimizer, lr)
        queries = next(batches).to(device).repeat_interleave(k, 0)  # (local_batch_size, context_length)

        # rollouts (no grad): sampling, then Response Processing 1-2 (reference logprobs, values, scores)
        clock = Stopwatch(device)
        query_responses, logprobs = sample_responses(policy, queries, args, pad_token_id, stop_token_id,
                                                     run.precision)
        clock.lap("generation")
        with adapters_disabled(policy):  # LoRA: the reference is the policy without its adapters (else: no-op)
            rollouts = score_responses(ref_policy or policy, value_model,
                                       reward_model if reward_tokenizer is None else None, queries, query_responses,
                                       logprobs, args, pad_token_id, stop_token_id, run.precision)
        if reward_tokenizer is not None:  # the reward model reads the texts, rendered again for its tokenizer
            rollouts["raw_scores"] = reward_model_scores(reward_model, reward_tokenizer, tokenizer, queries,
                                                         rollouts["postprocessed_responses"], conversations,
                                                         run.precision)
        # the texts' scores: reward functions enter the score with their weights, metric functions are only logged
        extra = text_scores({**metric_funcs, **reward_funcs}, tokenizer, queries, rollouts["postprocessed_responses"],
                            conversations)
        if reward_funcs:
            rollouts["raw_scores"] = rollouts["raw_scores"] + weighted_sum(extra, reward_weights, device)
        clock.lap("scoring")
        # Response Processing 3 (EOS penalty), 4. compute rewards, 5. whiten rewards, 6. advantages and returns
        batch = compute_advantages(rollouts, args, eos_token_id)
        # PPO epochs over minibatches, one optimizer step each
        stats = ppo_update(train_model, optimizer, batch, args, pad_token_id, minibatch_orders(args, update),
                           run.precision, run, update)
        clock.lap("update")

        # log every update, save on save_steps, sample completions every sample_generations_freq updates
        eps = int((update - start_update) * args.batch_size / (time.time() - start_time))
        logger.log({"eps": eps, **update_metrics(batch, stats, eos_token_id, extra), **clock.metrics(batch), "lr": lr,
                    **({"skipped_steps": run.skipped} if run.skipped else {}),  # on_nonfinite = "skip"
                    "episode": episode, "epoch": episode / (k * len(train_dataset)), "step": update})
        logger.update()
        check_update(run, update, model)  # before saving: nan/inf weights stop the run
        stopping = run.stop.requested(device)  # SIGTERM/SIGINT on any rank: save now and exit
        due = args.save_strategy == "steps" and (update % save_steps == 0 or update == args.num_total_batches)
        if stopping or due:
            save(run, update, saved, tokenizer, optimizer, {"step": update, "episode": episode})
        # rank 0 samples alone; sharded models need every rank, which then all compute the same completions
        if (run.dist.is_main or args.fsdp) and eval_dataset and (update - 1) % args.sample_generations_freq == 0:
            rows = sample_completions(policy, reward_model, tokenizer, eval_dataset, args, stop_token_id,
                                      run.precision, {**metric_funcs, **reward_funcs}, reward_weights, num_batches=1,
                                      **scoring)
            if run.dist.is_main:
                log_completions(rows, update, args.output_dir)
        if stopping:  # after this update's completions, which a resumed run does not repeat
            stop_now(run, update, logger)

    # the policy (TRL's save_model), the value model (TRL drops it) and final completions (TRL's ppo.py)
    logger.close()
    if args.use_peft:  # the adapter in PEFT's layout, the merged policy in merged/ (and the value model)
        save_final(run, {"merged": merged(policy), **{k: v for k, v in saved.items() if k}}, tokenizer)
        if run.dist.is_main:
            save_adapter(policy, args.output_dir, args.lora_r, args.lora_alpha, args.lora_dropout, args.sft_model_path)
    else:
        save_final(run, saved, tokenizer)
    if (run.dist.is_main or args.fsdp) and eval_dataset:
        rows = sample_completions(policy, reward_model, tokenizer, eval_dataset, args, stop_token_id, run.precision,
                                  {**metric_funcs, **reward_funcs}, reward_weights, **scoring)
        if run.dist.is_main:
            log_completions(rows, args.num_total_batches, args.output_dir)
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


def ppo_update(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], args: PPOConfig,
               pad_token_id: int, minibatch_orders: list[torch.Tensor], precision: torch.dtype | None = None,
               run: Run | None = None, update: int = 0) -> dict[str, torch.Tensor]:
    """PPO epochs (TRL: "Do multiple epochs of PPO training, with a fresh random shuffle in each epoch") over `batch`
    from compute_advantages, with one permutation of its rows per epoch.
    `model` is a PolicyAndValue: plain, DDP-wrapped or FSDP-sharded. Returns each statistic per micro-batch, shaped
    (num_ppo_epochs, num_mini_batches, micro-batches per minibatch).

    Each minibatch of local_mini_batch_size rows is split into micro-batches of per_device_train_batch_size whose
    losses are averaged into ONE optimizer step: TRL's intended cadence, which it follows when
    gradient_accumulation_steps = 1. With GA > 1 accelerate counts micro-batches across minibatches instead:
    with num_mini_batches > 1 TRL steps once per PPO epoch and leaves statistic slots at 0, and during the last batch
    of a dataloader epoch it steps after every micro-batch.
    `run` (main's; None in tests and benchmarks: no check) and `update`: a minibatch whose loss or gradient norm is
    nan/inf on any rank stops the run or, under on_nonfinite = "skip", is not stepped (AdamW's state untouched).
    """
    query_responses, responses = batch["query_responses"], batch["responses"]
    context_length = query_responses.shape[1] - responses.shape[1]
    device = query_responses.device
    micro_starts = range(0, args.local_mini_batch_size, args.per_device_train_batch_size)
    stats_shape = (len(minibatch_orders), args.num_mini_batches, len(micro_starts))
    critic = "values" in batch  # only "gae" has a value model
    keys = ["responses", "query_responses", "advantages", "logprobs", "ref_logprobs", "padding_mask",
            *(["returns", "values", "padding_mask_p1"] if critic else [])]
    stats = {key: torch.zeros(stats_shape, device=device) for key in STATS if critic or not key.startswith("vf_")}
    inner = getattr(model, "module", model)  # DDP wraps the PolicyAndValue
    models = (inner.policy, inner.value_model)
    for ppo_epoch_idx, b_inds in enumerate(minibatch_orders):
        for minibatch_idx, mini_batch_start in enumerate(range(0, args.local_batch_size, args.local_mini_batch_size)):
            mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + args.local_mini_batch_size]
            for gradient_accumulation_idx, micro_batch_start in enumerate(micro_starts):
                micro_batch_end = micro_batch_start + args.per_device_train_batch_size
                micro_batch_inds = mini_batch_inds[micro_batch_start:micro_batch_end]
                mb = {key: batch[key][micro_batch_inds] for key in keys}
                mb_responses, mb_query_responses = mb["responses"], mb["query_responses"]
                packing = rollout_packing(mb_query_responses, pad_token_id, context_length, *models) if (
                    args.padding_free) else None

                # DDP/FSDP average gradients over ranks once per minibatch, on its last micro-batch
                last = gradient_accumulation_idx == len(micro_starts) - 1
                with gradient_sync(model, last):
                    with autocast(device, precision):
                        # logits only where a response token is predicted (TRL projects every position)
                        output, vpred_temp = model(*model_inputs(mb_query_responses, pad_token_id),
                                                   logits_to_keep=responses.shape[1] + 1, packing=packing)
                    logits = output[:, :-1].float() / (args.temperature + 1e-7)  # (b, T, V)
                    new_logprobs = logprobs_from_logits(logits, gather_index(mb_responses, pad_token_id))
                    new_logprobs = new_logprobs.masked_fill(mb["padding_mask"], INVALID_LOGPROB)
                    pg_loss, pg_clipfrac, ratio = policy_loss(new_logprobs, mb, args)
                    loss = pg_loss
                    if critic:
                        vpred = vpred_temp[:, context_length - 1 : -1].float().masked_fill(mb["padding_mask_p1"], 0)
                        vf_loss, vf_clipfrac = ppo_value_loss(vpred, mb["values"], mb["returns"],
                                                              mb["padding_mask_p1"], args.cliprange_value)
                        loss = pg_loss + args.vf_coef * vf_loss
                    (loss / len(micro_starts)).backward()
                with torch.no_grad():
                    cell = (ppo_epoch_idx, minibatch_idx, gradient_accumulation_idx)
                    stats["approxkl"][cell] = 0.5 * ((new_logprobs - mb["logprobs"]) ** 2).mean()
                    stats["pg_clipfrac"][cell] = pg_clipfrac
                    stats["pg_loss"][cell] = pg_loss
                    if critic:
                        stats["vf_loss"][cell] = vf_loss
                        stats["vf_clipfrac"][cell] = vf_clipfrac
                    stats["entropy"][cell] = entropy_from_logits(logits).mean()
                    stats["ratio"][cell] = ratio.mean()
            # TRL never clips in PPO; max_grad_norm = 0 leaves the gradients as they are, but gives their norm
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
            losses = {k: stats[k][ppo_epoch_idx, minibatch_idx].sum() for k in ("pg_loss", "vf_loss") if k in stats}
            where = f"{update} (PPO epoch {ppo_epoch_idx + 1}, minibatch {minibatch_idx + 1})"
            if run is None or check_finite(run, where, {**losses, "grad_norm": grad_norm}):  # or stop, or skip
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return stats


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
