"""Supervised fine-tuning on prompt-completion data: the stage before reward modelling and PPO, as one short loop.

The loss is the mean token cross-entropy over completion tokens, as TRL's SFTTrainer computes it on prompt-completion
data (completion_only_loss): transformers' causal-LM loss summed over the labelled tokens and divided by their number
in the whole optimizer step, over all micro-batches and ranks (`num_items_in_batch`, average_tokens_across_devices).

References: Ouyang et al. 2022 (InstructGPT, the SFT stage); TRL trl/trainer/sft_trainer.py and sft_config.py;
transformers loss_utils.py (ForCausalLMLoss) and trainer.py (spec §1.3-§1.4 for steps, schedule and logging).

Run: `python -m minirlhf.sft configs/sft.toml [--key value ...]`, or under `torchrun -m`; `--help` lists every key.
Not implemented: packing, padding-free batches, evaluation, assistant-only loss. Under several ranks an incomplete
last round of batches is dropped in each epoch (accelerate would wrap around to the first samples instead).
"""

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from minirlhf.checkpoint import full_model_state, full_tensor, load_checkpoint, resolve_resume, save_checkpoint
from minirlhf.common import (
    MetricsLogger,
    all_reduce,
    autocast,
    cleanup_distributed,
    gradient_sync,
    init_distributed,
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
from minirlhf.data import collate_sft, load_rows, prepare_sft_dataset, shuffled_order
from minirlhf.model import CausalLM
from minirlhf.optim import AdamW, lr_multiplier, param_groups, schedule_kwargs, set_lr, warmup_steps_from
from minirlhf.tokenizer import Tokenizer


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning (TRL SFTConfig's defaults for the fields below)."""

    learning_rate: float = 2e-5
    """peak AdamW learning rate (TRL SFTConfig's default)"""
    max_length: int | None = 1024
    """truncate each prompt + completion to this many tokens, keeping the start; None: no limit"""

    def __post_init__(self):
        super().__post_init__()
        require(self.max_length is None or self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        require(self.eval_strategy == "no", "eval_strategy", "evaluation is not implemented in minirlhf.sft")
        require(self.save_strategy != "epoch", "save_strategy", "minirlhf.sft saves every save_steps ('steps') or 'no'")


def completion_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits predicting the next token against (B, T) labels (-100 = not a target),
    summed and divided by num_items_in_batch (default: the number of targets here), as transformers' ForCausalLMLoss."""
    shift_labels = labels[:, 1:]  # token t + 1 is predicted at position t
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shift_labels.flatten(), ignore_index=-100,
                           reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (shift_labels != -100).sum())


def main(argv: list[str] | None = None) -> None:
    args = parse_config_or_exit(SFTConfig, argv)
    ddp = init_distributed()
    device, precision = ddp.device, resolve_precision(args.bf16, args.fp16, ddp.device)
    seed_everything(args.seed)
    with exit_on_bad_input():
        require_torchrun_for_fsdp(args.fsdp)
        require(args.model_name_or_path is not None, "model_name_or_path", "is required")
        require(args.dataset_name is not None, "dataset_name", "is required")
        tokenizer = Tokenizer.from_pretrained(args.model_name_or_path, revision=args.model_revision)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # TRL's SFTTrainer pads with EOS when there is no pad token
        rows = load_rows(args.dataset_name, args.dataset_train_split)
        source = f"{args.dataset_name} [{args.dataset_train_split}]"
        examples, n_dropped = prepare_sft_dataset(rows, tokenizer, args.max_length, source=source)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    model = CausalLM.from_pretrained(str(resume or args.model_name_or_path), revision=args.model_revision,
                                     dtype=args.dtype, device=device)
    model.transformer.gradient_checkpointing = args.gradient_checkpointing
    model.train()
    if args.fsdp:
        shard_model(model, args.fsdp)  # in place, before the optimizer sees the parameters
    train_model = DDP(model) if ddp.world_size > 1 and not args.fsdp else model
    optimizer = AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate,
                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    state = load_checkpoint(resume, optimizer, ddp.rank) if resume is not None else {"global_step": 0}

    # ---- steps, as transformers.Trainer counts them (spec §1.4)
    per_round = args.per_device_train_batch_size * ddp.world_size
    batches_per_epoch = len(examples) // per_round if args.dataloader_drop_last or ddp.world_size > 1 else math.ceil(
        len(examples) / args.per_device_train_batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f"{args.dataset_name}: {len(examples)} examples, fewer than one batch of {per_round}")
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = warmup_steps_from(args.warmup_steps, max_steps)
    lr_kwargs = schedule_kwargs(args.lr_scheduler_type, args.lr_scheduler_kwargs)
    logging_steps, save_steps = steps_from(args.logging_steps, max_steps), steps_from(args.save_steps, max_steps)
    if ddp.is_main:
        save_config(args, Path(args.output_dir) / "config.toml")
        print(f"[minirlhf] {len(examples)} examples ({n_dropped} dropped: no completion token left), {max_steps} steps")
    logger = MetricsLogger(args.output_dir, args.report_to, ddp.is_main, max_steps, args.disable_tqdm)
    logger.update(state["global_step"])

    step, window = 0, []  # window: the loss of each step since the last log
    seed = args.seed if args.data_seed is None else args.data_seed
    for epoch in itertools.count():
        # accelerate's seedable sampler, rank r taking batches r, r + world_size, ... (spec §1.4)
        order = shuffled_order(len(examples), seed, epoch)
        starts = [(k * ddp.world_size + ddp.rank) * args.per_device_train_batch_size for k in range(batches_per_epoch)]
        groups = [starts[i : i + args.gradient_accumulation_steps]
                  for i in range(0, len(starts), args.gradient_accumulation_steps)]
        for group_idx, group in enumerate(groups):
            step += 1
            if step <= state["global_step"]:  # resuming: the data order is fixed, so skipping is enough
                continue
            set_lr(optimizer, args.learning_rate * lr_multiplier(step - 1, max_steps, warmup, args.lr_scheduler_type,
                                                                 **lr_kwargs))
            batches = [collate_sft([examples[i] for i in order[s : s + args.per_device_train_batch_size]],
                                   tokenizer.pad_token_id) for s in group]
            num_items_in_batch = all_reduce(sum((b["labels"][:, 1:] != -100).sum() for b in batches), "sum")
            step_loss = 0.0
            for i, b in enumerate(batches):
                last = i == len(batches) - 1  # gradients are averaged over ranks in the last backward only
                with gradient_sync(train_model, last):
                    with autocast(device, precision):
                        logits = train_model(b["input_ids"].to(device), b["attention_mask"].to(device))
                    # DDP/FSDP average over ranks; the world_size factor makes it a mean over all ranks' tokens
                    loss = completion_loss(logits, b["labels"].to(device), num_items_in_batch) * ddp.world_size
                    loss.backward()
                step_loss += loss.item() / ddp.world_size
            max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(all_reduce(torch.tensor(step_loss), "sum").item())
            logger.update()
            if step % logging_steps == 0 or step == max_steps:
                logger.log({"loss": sum(window) / len(window), "grad_norm": grad_norm,
                            "learning_rate": optimizer.param_groups[0]["lr"],
                            "epoch": epoch + (group_idx + 1) / len(groups), "step": step})
                window = []
            if args.save_strategy == "steps" and (step % save_steps == 0 or step == max_steps):
                save_checkpoint(args.output_dir, step, {"": model}, tokenizer, optimizer, {"global_step": step},
                                config_to_toml(args), ddp.rank, args.save_total_limit)
            if step == max_steps:
                break
        if step >= max_steps:
            break

    logger.close()
    weights = full_model_state(model)  # a collective when FSDP-sharded
    if ddp.is_main:
        model.save_pretrained(args.output_dir, state_dict=weights)
        tokenizer.save_pretrained(args.output_dir)
    cleanup_distributed()


if __name__ == "__main__":
    main()
