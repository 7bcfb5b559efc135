"""Reward-model training: TRL's RewardTrainer as one flat loop (Bradley-Terry loss on chosen/rejected pairs).

References: Ouyang et al. 2022 (InstructGPT, Eq. 1); Eisenstein et al. 2023 (Eq. 2, reward centring);
TRL trl/trainer/reward_config.py and reward_trainer.py (`RewardTrainer.compute_loss`), run by transformers'
`Trainer._inner_training_loop` (trainer.py).

Run: `python -m minirlhf.reward configs/reward.toml [--key value ...]`, or under `torchrun -m` for several ranks;
`--help` lists every key. `--do_train false` evaluates model_name_or_path on dataset_test_split and trains nothing.

RewardConfig keeps TRL's names and defaults. TRL keys left out, accepted only at TRL's default (see --help):
`model_init_kwargs` (its useful entries are the `dtype` and `model_revision` keys), `trust_remote_code` (minirlhf
never runs Hub code), `dataset_num_proc` (tokenization runs in the main process; there is no `datasets.map`),
`activation_offloading` (gradient_checkpointing is minirlhf's way to save activation memory).
What `main` calls from minirlhf/infra (config, run lifecycle, checkpoints, several ranks, padding-free forwards, LoRA)
can be skipped on a first reading: in one process it is I/O, a no-op, or a shortcut with the same results.
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from minirlhf.data import collate_preference, prepare_preference_dataset, rank_batches
from minirlhf.infra.config import TrainingConfig, exit_on_bad_input, require
from minirlhf.infra.files import load_rows
from minirlhf.infra.hf import load_pretrained
from minirlhf.infra.lora import LoraArgs, add_lora
from minirlhf.infra.metrics import LogWindow, MetricsLogger
from minirlhf.infra.packing import PaddingFreeRewardModel
from minirlhf.infra.parallel import all_reduce, cleanup_distributed, gradient_sync, print0
from minirlhf.infra.run import (
    Run,
    autocast,
    checkpoint_or_stop,
    count_steps,
    due,
    optimizer_step,
    prepare,
    save_eval,
    save_final,
    scheduled_lr,
    start,
)
from minirlhf.infra.tokenizer import Tokenizer
from minirlhf.losses import reward_loss, reward_metrics
from minirlhf.model import RewardModel, disable_dropout
from minirlhf.optim import set_lr, steps_from


@dataclass
class RewardConfig(LoraArgs, TrainingConfig):
    """Reward-model training (TRL RewardConfig: TrainingArguments + TRL's defaults + the fields below)."""

    trl_defaults_only: ClassVar[dict[str, object]] = {
        "model_init_kwargs": None, "trust_remote_code": False, "dataset_num_proc": None, "activation_offloading": False,
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
    padding_free: bool = True
    """minirlhf: compute no pads (infra/packing.py); the results are the padded batch's, with less arithmetic"""
    shared_prefix: bool = True
    """minirlhf: with padding_free, compute the leading tokens a pair's sides share (the prompt) once; off by itself
    while dropout is on (one dropout draw would serve both sides)"""

    def __post_init__(self):
        super().__post_init__()
        for key in ("max_length", "pad_to_multiple_of"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, f"must be >= 1 or none, got {value!r}")
        # TRL also takes a tokenizer path here and copies its template (clone_chat_template); minirlhf does not.
        path = self.chat_template_path
        require(path is None or Path(path).suffix in (".jinja", ".j2"), "chat_template_path",
                f"must be a .jinja or .j2 file, got {path!r}")


def main(argv: list[str] | None = None) -> None:
    run = start(RewardConfig, argv)
    args, device = run.args, run.dist.device
    with exit_on_bad_input():
        model, tokenizer, train_dataset, eval_dataset = load(args, device)
        if not args.do_train:  # transformers' do_train = False: evaluate model_name_or_path, save no model
            save_eval(run, evaluate(model, eval_dataset, args, run, tokenizer.pad_token_id))
            return
        n_batches, steps_per_epoch, total_steps = count_steps(args, len(train_dataset), run.dist.world_size)
    # Training state: everything a resumed run needs to continue bit for bit (the data order is a function of the
    # epoch, so a position in it is enough); window: what the next log averages.
    train_model, optimizer, state = prepare(run, model, tokenizer, new_state={
        "step": 0, "epoch": 0, "group": 0, "num_tokens": 0, "window": asdict(LogWindow())})
    window = LogWindow(**state["window"])

    world, per_device, ga = run.dist.world_size, args.per_device_train_batch_size, args.gradient_accumulation_steps
    logging_steps, eval_steps, save_steps = (steps_from(args.logging_steps, total_steps),
                                             steps_from(args.eval_steps or 1, total_steps),
                                             steps_from(args.save_steps, total_steps))
    print0(f"[minirlhf] {len(train_dataset)} pairs, {n_batches} batches of {per_device * world} per epoch, "
           f"{total_steps} optimizer steps ({steps_per_epoch} per epoch)")
    logger = MetricsLogger(args, run.dist.is_main, total_steps, state["step"])
    seed = args.seed if args.data_seed is None else args.data_seed

    start_time, epoch_float = time.time(), float(state["epoch"])
    while state["step"] < total_steps:
        # 1. this epoch's micro-batches for this rank, in groups of gradient_accumulation_steps (the last may be short)
        epoch = state["epoch"]
        batches = rank_batches(len(train_dataset), per_device, seed, epoch, run.dist.rank, world,
                               args.dataloader_drop_last)
        groups = [batches[i : i + ga] for i in range(0, len(batches), ga)]
        for g in range(state["group"], len(groups)):
            train_model.train()
            step_loss = 0.0  # over all ranks, as logged
            # 2. forward/backward each micro-batch: chosen and rejected in one concatenated forward
            for i, indices in enumerate(groups[g]):
                batch = {k: v.to(device) for k, v in collate_preference(
                    [train_dataset[j] for j in indices], tokenizer.pad_token_id, args.pad_to_multiple_of).items()}
                # gradients are averaged over ranks once per optimizer step, in the last micro-batch's backward
                with gradient_sync(train_model, i == len(groups[g]) - 1):
                    with autocast(device, run.precision):
                        rewards = train_model(batch["input_ids"], batch["attention_mask"]).squeeze(-1).float()  # (2B,)
                    rewards_chosen, rewards_rejected = rewards.chunk(2)  # (B,), (B,)
                    loss = reward_loss(rewards_chosen, rewards_rejected, batch.get("margin"),
                                       args.center_rewards_coefficient)
                    # A short last group divides by its own size (transformers' current_gradient_accumulation_steps)
                    (loss / len(groups[g])).backward()
                micro_loss = all_reduce(loss.detach() / len(groups[g])).item()
                step_loss += micro_loss
                window.add(micro_loss, batch_metrics(rewards_chosen, rewards_rejected))
                state["num_tokens"] += int(all_reduce(batch["attention_mask"].sum(), "sum").item())
            # 3. clip (the norm before clipping is logged), then step with the scheduled learning rate
            lr = scheduled_lr(args, state["step"], total_steps)
            set_lr(optimizer, lr)
            grad_norm = optimizer_step(run, model, state["step"] + 1, step_loss)  # or stop, or skip
            state["step"] += 1
            window.steps += 1
            state["epoch"], state["group"] = (epoch, g + 1) if g + 1 < len(groups) else (epoch + 1, 0)
            epoch_float = epoch + min((g + 1) * ga, len(batches)) / len(batches)
            logger.update()

            # 4. log, evaluate and save on the transformers schedule (DefaultFlowCallback; "steps" also at the end)
            step, done, epoch_end = state["step"], state["step"] >= total_steps, g + 1 == len(groups)
            if due(args.logging_strategy, step, logging_steps, epoch_end) or (args.logging_first_step and step == 1):
                means = window.pop()
                logger.log({"loss": means.pop("loss"), "grad_norm": grad_norm, "learning_rate": lr,
                            "num_tokens": state["num_tokens"], **means, **run.skipped_steps(), "epoch": epoch_float,
                            "step": step})
            if due(args.eval_strategy, step, eval_steps, epoch_end) or (args.eval_strategy == "steps" and done):
                metrics = evaluate(train_model, eval_dataset, args, run, tokenizer.pad_token_id)
                logger.log({**metrics, "eval_num_tokens": state["num_tokens"], "epoch": epoch_float, "step": step})
            state["window"] = asdict(window)
            checkpoint_or_stop(run, step, due(args.save_strategy, step, save_steps, epoch_end) or (
                args.save_strategy == "steps" and done), state, logger)
            if done:
                break

    # 5. the closing record (transformers' train_* keys) and the final model in Hugging Face layout
    runtime = time.time() - start_time
    logger.log({"train_runtime": runtime, "train_samples_per_second": total_steps * per_device * world * ga / runtime,
                "train_steps_per_second": total_steps / runtime,
                "train_loss": (window.total_loss + window.loss) / total_steps, **window.metric_means(),
                "epoch": epoch_float, "step": state["step"]})
    logger.close()
    save_final(run, args.model_name_or_path)
    cleanup_distributed()


# ---------------------------------------------------------------------------------------------------------------------
# Setup, metrics and evaluation


def load(args: RewardConfig, device: torch.device):
    """Model, tokenizer and tokenized datasets, in TRL's order (`RewardTrainer.__init__`)."""
    require(args.model_name_or_path is not None, "model_name_or_path", "is required")
    require(args.dataset_name is not None, "dataset_name", "is required")
    # padding_free: the same model, with forwards that compute no pads (infra/packing.py)
    model = load_pretrained(PaddingFreeRewardModel if args.padding_free else RewardModel, args.model_name_or_path,
                            revision=args.model_revision, dtype=args.dtype, device=device, new_model=True)
    if args.padding_free:
        model.shared_prefix = args.shared_prefix
    tokenizer = Tokenizer.from_pretrained(args.model_name_or_path, revision=args.model_revision)
    if args.eos_token is not None:
        tokenizer.eos_token = args.eos_token
    if args.chat_template_path is not None:
        tokenizer.chat_template = Path(args.chat_template_path).read_text()
    if args.use_peft:  # the new score head trains in full, as PEFT's SEQ_CLS task does (modules_to_save)
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        model.score.requires_grad_(True)
    if args.disable_dropout:
        disable_dropout(model)
    tokenizer.pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    model.cfg.pad_token_id = tokenizer.pad_token_id  # pooling reads it, and it is saved in config.json
    model.transformer.gradient_checkpointing = args.gradient_checkpointing

    def dataset(split: str, evaluation: bool = False) -> list[dict]:
        source = f"{args.dataset_name} [{split}]"  # evaluation: never the training rows again (a single data file)
        examples, dropped = prepare_preference_dataset(load_rows(args.dataset_name, split, evaluation=evaluation),
                                                       tokenizer, args.max_length, source)
        print0(f"[minirlhf] {source}: {len(examples)} pairs, {dropped} dropped for exceeding max_length")
        return examples

    train_dataset = dataset(args.dataset_train_split) if args.do_train else []
    evaluating = args.eval_strategy != "no" or not args.do_train
    eval_dataset = dataset(args.dataset_test_split, evaluation=True) if evaluating else []
    return model, tokenizer, train_dataset, eval_dataset


@torch.no_grad()
def batch_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> dict[str, float]:
    """reward_metrics over every rank's (equal) micro-batch, as TRL gathers them in `RewardTrainer.compute_loss`."""
    ops = {"min_reward": "min", "max_reward": "max"}
    local = reward_metrics(rewards_chosen, rewards_rejected)
    return {k: all_reduce(torch.tensor(v), ops.get(k, "mean")).item() for k, v in local.items()}


@torch.no_grad()
def evaluate(model, eval_dataset: list[dict], args: RewardConfig, run: Run, pad_token_id: int) -> dict[str, float]:
    """eval_loss weighted by pairs, TRL's reward metrics averaged over batches (transformers' evaluation_loop)."""
    start_time, (rank, world), device = time.time(), (run.dist.rank, run.dist.world_size), run.dist.device
    model.eval()
    all_batches = [range(i, min(i + args.per_device_eval_batch_size, len(eval_dataset)))
                   for i in range(0, len(eval_dataset), args.per_device_eval_batch_size)]
    batches = all_batches[rank::world]
    loss_sum, pairs, history = torch.zeros(()), torch.zeros(()), []
    # Every rank runs the same rounds: each round's metrics are all-reduced, and under FSDP each forward gathers
    # weights from every rank. A rank one batch short wraps around to the first batch, as accelerate's even_batches
    # does; that batch enters the reward metrics (TRL gathers padded batches too) but not eval_loss.
    for n in range(math.ceil(len(all_batches) / world)):
        spare = n >= len(batches)
        indices = all_batches[0] if spare else batches[n]
        batch = {k: v.to(device) for k, v in collate_preference(
            [eval_dataset[i] for i in indices], pad_token_id, args.pad_to_multiple_of).items()}
        with autocast(device, run.precision):
            rewards = model(batch["input_ids"], batch["attention_mask"]).squeeze(-1).float()  # (2B,)
        chosen, rejected = rewards.chunk(2)
        if not spare:
            loss = reward_loss(chosen, rejected, batch.get("margin"), args.center_rewards_coefficient)
            loss_sum += loss.cpu() * len(indices)
            pairs += len(indices)
        history.append(batch_metrics(chosen, rejected))
    runtime = time.time() - start_time
    metrics = {"eval_loss": (all_reduce(loss_sum, "sum") / all_reduce(pairs, "sum")).item(),
               "eval_runtime": runtime, "eval_samples_per_second": len(eval_dataset) / runtime,
               "eval_steps_per_second": len(batches) / runtime}
    metrics.update({f"eval_{k}": sum(h[k] for h in history) / len(history) for k in history[0]})
    return metrics


if __name__ == "__main__":
    main()
