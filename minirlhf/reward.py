"""Reward-model training: TRL's RewardTrainer as one flat loop (Bradley-Terry loss on chosen/rejected pairs).

References: Ouyang et al. 2022 (InstructGPT, Eq. 1); Eisenstein et al. 2023 (Eq. 2, reward centring);
TRL trl/trainer/reward_config.py and reward_trainer.py (spec §1-§2).

Run: `python -m minirlhf.reward configs/reward.toml [--key value ...]`, or under `torchrun -m` for several ranks;
`--help` lists every key.

RewardConfig keeps TRL's names and defaults. TRL keys left out, accepted only at TRL's default (see --help):
`model_init_kwargs` (its useful entries are the `dtype` and `model_revision` keys), `trust_remote_code` (minirlhf
never runs Hub code), `dataset_num_proc` (tokenization runs in the main process; there is no `datasets.map`).
"""

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minirlhf.checkpoint import full_model_state, full_tensor, load_checkpoint, resolve_resume, save_checkpoint
from minirlhf.common import (
    MetricsLogger,
    all_reduce,
    autocast,
    cleanup_distributed,
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
from minirlhf.data import collate_preference, load_rows, prepare_preference_dataset, shuffled_order
from minirlhf.losses import reward_loss, reward_metrics
from minirlhf.model import RewardModel, disable_dropout
from minirlhf.optim import AdamW, lr_multiplier, param_groups, schedule_kwargs, set_lr, warmup_steps_from
from minirlhf.tokenizer import Tokenizer


@dataclass
class RewardConfig(TrainingConfig):
    """Reward-model training (TRL RewardConfig: TrainingArguments + TRL's defaults + the fields below)."""

    trl_defaults_only: ClassVar[dict[str, object]] = {
        "model_init_kwargs": None, "trust_remote_code": False, "dataset_num_proc": None,
    }

    learning_rate: float = 1e-4
    """peak AdamW learning rate (TRL RewardConfig's default; TrainingArguments has 5e-5)"""
    max_length: int | None = 1024
    """drop pairs whose chosen or rejected side is longer than this many tokens (TRL filters, never truncates)"""
    pad_to_multiple_of: int | None = None
    """pad each batch's sequence length up to a multiple of this"""
    eos_token: str | None = None
    """end-of-sequence token appended to non-conversational texts; None: the tokenizer's (must be in the vocabulary)"""
    pad_token: str | None = None
    """pad token; None: the tokenizer's, else its EOS (TRL deprecates this key for tokenizer.pad_token, not in TOML)"""
    chat_template_path: str | None = None
    """a .jinja/.j2 file used as the chat template for conversational data (needs jinja2)"""
    disable_dropout: bool = True
    """set every dropout probability in the model to 0"""
    center_rewards_coefficient: float | None = None
    """weight of the mean-zero reward penalty (Eisenstein et al. 2023, Eq. 2; 0.01 recommended); None: off"""
    activation_offloading: bool = False
    """keep activations saved for backward in CPU memory (torch.autograd.graph.save_on_cpu); no effect on CPU"""

    def __post_init__(self):
        super().__post_init__()
        for key in ("max_length", "pad_to_multiple_of"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, f"must be >= 1 or none, got {value!r}")
        # TRL also takes a tokenizer path here and copies its template (clone_chat_template); minirlhf does not.
        path = self.chat_template_path
        require(path is None or Path(path).suffix in (".jinja", ".j2"), "chat_template_path",
                f"must be a .jinja or .j2 file, got {path!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Setup


def load(cfg: RewardConfig, device: torch.device):
    """Model, tokenizer and tokenized datasets, in TRL's order (spec §2.1)."""
    require(cfg.model_name_or_path is not None, "model_name_or_path", "is required")
    require(cfg.dataset_name is not None, "dataset_name", "is required")
    seed_everything(cfg.seed)  # before loading: a new score head is the first random draw (huggingface/trl#4887)
    model = RewardModel.from_pretrained(cfg.model_name_or_path, revision=cfg.model_revision, dtype=cfg.dtype,
                                        device=device)
    tokenizer = Tokenizer.from_pretrained(cfg.model_name_or_path, revision=cfg.model_revision)
    if cfg.eos_token is not None:
        tokenizer.eos_token = cfg.eos_token
    if cfg.chat_template_path is not None:
        tokenizer.chat_template = Path(cfg.chat_template_path).read_text()
    if cfg.disable_dropout:
        disable_dropout(model)
    tokenizer.pad_token = cfg.pad_token or tokenizer.pad_token or tokenizer.eos_token
    model.cfg.pad_token_id = tokenizer.pad_token_id  # pooling reads it, and it is saved in config.json
    model.transformer.gradient_checkpointing = cfg.gradient_checkpointing

    def dataset(split: str) -> list[dict]:
        source = f"{cfg.dataset_name} [{split}]"
        examples, dropped = prepare_preference_dataset(load_rows(cfg.dataset_name, split, None), tokenizer,
                                                       cfg.max_length, source)
        print0(f"[minirlhf] {source}: {len(examples)} pairs, {dropped} dropped for exceeding max_length")
        return examples

    train_set = dataset(cfg.dataset_train_split)
    eval_set = dataset(cfg.dataset_test_split) if cfg.eval_strategy != "no" else []
    return model, tokenizer, train_set, eval_set


@torch.no_grad()
def batch_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> dict[str, float]:
    """reward_metrics over every rank's micro-batch, as TRL gathers them (spec §2.7; ranks hold equal batches)."""
    ops = {"min_reward": "min", "max_reward": "max"}
    local = reward_metrics(rewards_chosen, rewards_rejected)
    return {k: all_reduce(torch.tensor(v), ops.get(k, "mean")).item() for k, v in local.items()}


@torch.no_grad()
def evaluate(model, eval_set: list[dict], cfg: RewardConfig, env, amp_dtype, pad_token_id: int) -> dict[str, float]:
    """eval_loss weighted by pairs, TRL's reward metrics averaged over batches (spec §1.4, §2.7)."""
    start = time.time()
    model.eval()
    all_batches = [range(i, min(i + cfg.per_device_eval_batch_size, len(eval_set)))
                   for i in range(0, len(eval_set), cfg.per_device_eval_batch_size)]
    batches = all_batches[env.rank :: env.world_size]
    loss_sum, pairs, history = torch.zeros(()), torch.zeros(()), []
    # Every rank runs the same rounds: each round's metrics are all-reduced, and under FSDP each forward gathers
    # weights from every rank. A rank one batch short wraps around to the first batch, as accelerate's even_batches
    # does; that batch enters the reward metrics (TRL gathers padded batches too) but not eval_loss.
    for n in range(math.ceil(len(all_batches) / env.world_size)):
        spare = n >= len(batches)
        indices = all_batches[0] if spare else batches[n]
        batch = {k: v.to(env.device) for k, v in collate_preference(
            [eval_set[i] for i in indices], pad_token_id, cfg.pad_to_multiple_of).items()}
        with autocast(env.device, amp_dtype):
            rewards = model(batch["input_ids"], batch["attention_mask"]).squeeze(-1).float()  # (2B,)
        chosen, rejected = rewards.chunk(2)
        if not spare:
            loss = reward_loss(chosen, rejected, batch.get("margin"), cfg.center_rewards_coefficient)
            loss_sum += loss.cpu() * len(indices)
            pairs += len(indices)
        history.append(batch_metrics(chosen, rejected))
    runtime = time.time() - start
    metrics = {"eval_loss": (all_reduce(loss_sum, "sum") / all_reduce(pairs, "sum")).item(),
               "eval_runtime": runtime, "eval_samples_per_second": len(eval_set) / runtime,
               "eval_steps_per_second": len(batches) / runtime}
    metrics.update({f"eval_{k}": sum(h[k] for h in history) / len(history) for k in history[0]})
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Training


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config_or_exit(RewardConfig, argv)
    env = init_distributed()
    with exit_on_bad_input():
        require_torchrun_for_fsdp(cfg.fsdp)
        model, tokenizer, train_set, eval_set = load(cfg, env.device)
        resume_dir = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    amp_dtype = resolve_precision(cfg.bf16, cfg.fp16, env.device)
    output_dir, pad_token_id = Path(cfg.output_dir), tokenizer.pad_token_id
    if env.is_main:
        save_config(cfg, output_dir / "config.toml")

    # Sizes, as transformers.Trainer computes them (spec §1.4). Batches are per rank; accelerate deals rank r
    # every world_size-th batch of the shuffled order, which is what slicing a global batch by rank gives.
    global_batch = cfg.per_device_train_batch_size * env.world_size
    n_batches = len(train_set) // global_batch if cfg.dataloader_drop_last else math.ceil(len(train_set) / global_batch)
    ga = cfg.gradient_accumulation_steps
    steps_per_epoch = max(math.ceil(n_batches / ga), 1)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    warmup_steps = warmup_steps_from(cfg.warmup_steps, total_steps)
    lr_kwargs = schedule_kwargs(cfg.lr_scheduler_type, cfg.lr_scheduler_kwargs)
    logging_steps = steps_from(cfg.logging_steps, total_steps)
    eval_steps = steps_from(cfg.eval_steps, total_steps) if cfg.eval_strategy == "steps" else 0
    save_steps = steps_from(cfg.save_steps, total_steps) if cfg.save_strategy == "steps" else 0
    print0(f"[minirlhf] {len(train_set)} pairs, {n_batches} batches of {global_batch} per epoch, "
           f"{total_steps} optimizer steps ({steps_per_epoch} per epoch), {warmup_steps} warmup")

    if resume_dir is not None:
        trained = RewardModel.from_pretrained(str(resume_dir), dtype=cfg.dtype, device=env.device)
        model.load_state_dict(trained.state_dict())
    if cfg.fsdp:
        shard_model(model, cfg.fsdp)  # in place: `model` now holds this rank's shards
    train_model = DDP(model) if env.world_size > 1 and not cfg.fsdp else model
    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    # Training state: everything a resumed run needs to continue bit for bit (the data order is a function of
    # the epoch, so a position in it is enough).
    state = {"step": 0, "epoch": 0, "group": 0, "num_tokens": 0, "window_loss": 0.0, "total_loss": 0.0,
             "last_logged": 0, "window": {}}
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, optimizer, env.rank)
        print0(f"[minirlhf] resumed from {resume_dir} at step {state['step']}")
    logger = MetricsLogger(cfg.output_dir, cfg.report_to, env.is_main, total_steps, cfg.disable_tqdm)
    logger.update(state["step"])
    offload = torch.autograd.graph.save_on_cpu if cfg.activation_offloading else contextlib.nullcontext

    def log(metrics: dict, epoch: float) -> None:
        logger.log({**metrics, "epoch": epoch, "step": state["step"]})

    def save() -> None:
        save_checkpoint(output_dir, state["step"], {"": model}, tokenizer, optimizer, state, config_to_toml(cfg),
                        env.rank, cfg.save_total_limit)

    start_time, epoch_float, last_eval = time.time(), float(state["epoch"]), -1
    while state["step"] < total_steps:
        epoch = state["epoch"]
        # 1. this epoch's batches: the seeded permutation of accelerate's sampler, cut into global batches
        order = shuffled_order(len(train_set), cfg.seed if cfg.data_seed is None else cfg.data_seed, epoch)
        batches = [order[i : i + global_batch] for i in range(0, n_batches * global_batch, global_batch)]
        if env.world_size > 1 and len(batches[-1]) < global_batch:  # accelerate's even_batches: wrap around
            batches[-1] += order[: global_batch - len(batches[-1])]
        per_device = cfg.per_device_train_batch_size
        my_batches = [b[env.rank * per_device : (env.rank + 1) * per_device] for b in batches]
        groups = [my_batches[i : i + ga] for i in range(0, len(my_batches), ga)]  # the last one may be shorter
        for g in range(state["group"], len(groups)):
            train_model.train()
            # 2. forward/backward each micro-batch: chosen and rejected in one concatenated forward (spec §2.5)
            for i, indices in enumerate(groups[g]):
                batch = {k: v.to(env.device) for k, v in collate_preference(
                    [train_set[j] for j in indices], pad_token_id, cfg.pad_to_multiple_of).items()}
                # gradients are averaged over ranks once per optimizer step, in the last micro-batch's backward
                last = i == len(groups[g]) - 1
                with gradient_sync(train_model, last), offload():
                    with autocast(env.device, amp_dtype):
                        rewards = train_model(batch["input_ids"], batch["attention_mask"]).squeeze(-1).float()  # (2B,)
                    rewards_chosen, rewards_rejected = rewards.chunk(2)  # (B,), (B,)
                    loss = reward_loss(rewards_chosen, rewards_rejected, batch.get("margin"),
                                       cfg.center_rewards_coefficient)
                    # A short last group divides by its own size (transformers' current_gradient_accumulation_steps)
                    (loss / len(groups[g])).backward()
                state["window_loss"] += all_reduce(loss.detach() / len(groups[g])).item()
                state["num_tokens"] += int(all_reduce(batch["attention_mask"].sum(), "sum").item())
                for key, value in batch_metrics(rewards_chosen, rewards_rejected).items():
                    state["window"].setdefault(key, []).append(value)
            # 3. clip (the norm before clipping is logged), then step with the scheduled learning rate
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)).item()
            lr = cfg.learning_rate * lr_multiplier(state["step"], total_steps, warmup_steps, cfg.lr_scheduler_type,
                                                   **lr_kwargs)
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["epoch"], state["group"] = (epoch, g + 1) if g + 1 < len(groups) else (epoch + 1, 0)
            epoch_float = epoch + min((g + 1) * ga, len(my_batches)) / len(my_batches)
            logger.update()

            # 4. log, evaluate and save on the transformers schedule (spec §1.4 callbacks)
            step, done, epoch_end = state["step"], state["step"] >= total_steps, g + 1 == len(groups)
            log_now = step % logging_steps == 0 or (cfg.logging_first_step and step == 1)
            if (cfg.logging_strategy == "steps" and log_now) or (cfg.logging_strategy == "epoch" and epoch_end):
                window = state["window"]
                log({"loss": state["window_loss"] / (step - state["last_logged"]), "grad_norm": grad_norm,
                     "learning_rate": lr, "num_tokens": state["num_tokens"],
                     **{k: sum(v) / len(v) for k, v in window.items()}}, epoch_float)
                state["total_loss"] += state["window_loss"]
                state["window_loss"], state["last_logged"], state["window"] = 0.0, step, {}
            if (eval_steps and (step % eval_steps == 0 or done)) or (cfg.eval_strategy == "epoch" and epoch_end):
                metrics = evaluate(train_model, eval_set, cfg, env, amp_dtype, pad_token_id)
                log({**metrics, "eval_num_tokens": state["num_tokens"]}, epoch_float)
                last_eval = step
            if (save_steps and (step % save_steps == 0 or done)) or (cfg.save_strategy == "epoch" and epoch_end):
                save()
            if done:
                break

    # 5. the closing record (transformers' train_* keys) and the final model in Hugging Face layout
    runtime = time.time() - start_time
    state["total_loss"] += state["window_loss"]
    final = {"train_runtime": runtime, "train_samples_per_second": total_steps * global_batch * ga / runtime,
             "train_steps_per_second": total_steps / runtime, "train_loss": state["total_loss"] / total_steps,
             **{k: sum(v) / len(v) for k, v in state["window"].items()}}
    log(final, epoch_float)
    logger.close()
    weights = full_model_state(model)  # a collective when FSDP-sharded
    if env.is_main:
        model.save_pretrained(str(output_dir), state_dict=weights)
        tokenizer.save_pretrained(str(output_dir))
        print0(f"[minirlhf] saved the reward model to {output_dir} (last eval at step {last_eval})")
    cleanup_distributed()


if __name__ == "__main__":
    main()
