"""What reward, SFT and PPO training share around their loops, so each entry point shows only what is its own.

Every `main()` reads: config -> `start` (parse, join the ranks, seed, precision, find the checkpoint) -> load its
models and data -> `prepare` (resume the weights, shard or wrap, AdamW, resume its state) -> its loop, with
`scheduled_lr`, `optimizer_step` and `due` -> `save_final`. References: transformers 5.23 trainer.py
(`Trainer._inner_training_loop`) and trainer_callback.py (`DefaultFlowCallback`).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minirlhf.checkpoint import load_checkpoint, load_checkpoint_weights, resolve_resume
from minirlhf.common import Dist, init_distributed, print0, resolve_precision, seed_everything
from minirlhf.config import TrainingConfig, exit_on_bad_input, parse_config_or_exit, require, save_config
from minirlhf.hf import save_pretrained
from minirlhf.optim import AdamW, lr_multiplier, param_groups, steps_from
from minirlhf.parallel import distribute, full_model_state, full_tensor


@dataclass
class Run:
    """A started run: its config, its process (rank, world size, device), the autocast dtype (None: fp32) and the
    checkpoint it resumes from (None: a fresh start)."""

    args: TrainingConfig
    dist: Dist
    precision: torch.dtype | None
    resume: Path | None


def start(config_class: type, argv: list[str] | None) -> Run:
    args = parse_config_or_exit(config_class, argv)
    dist = init_distributed()
    with exit_on_bad_input():
        # FSDP shards over the processes torchrun starts; in a plain process it is a config error
        require(not args.fsdp or torch.distributed.is_initialized(), "fsdp",
                "needs several processes: launch with torchrun --nproc_per_node=N, or leave fsdp unset")
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    seed_everything(args.seed)  # before loading: a new score head is the first random draw (huggingface/trl#4887)
    return Run(args, dist, resolve_precision(args.bf16, args.fp16, dist.device), resume)


def prepare(run: Run, model: nn.Module, saved: dict[str, nn.Module], sharded: tuple[nn.Module, ...] = ()):
    """(the module the loop calls, the optimizer over `model`, trainer_state or None on a fresh start). `saved` maps
    each checkpoint subfolder to its model ("" = the checkpoint itself); `sharded`: the models to shard (FSDP)."""
    args = run.args
    if run.resume is not None:
        load_checkpoint_weights(run.resume, saved)  # before sharding: whole tensors into whole parameters
    train_model = distribute(model, args.fsdp, sharded)
    optimizer = AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate,
                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    state = None
    if run.resume is not None:
        state = load_checkpoint(run.resume, optimizer, run.dist.rank)
        print0(f"[minirlhf] resumed from {run.resume} at step {state['step']}")
    if run.dist.is_main:
        save_config(args, Path(args.output_dir) / "config.toml")
    return train_model, optimizer, state


def count_steps(args: TrainingConfig, n_examples: int, world_size: int) -> tuple[int, int, int]:
    """(batches per epoch per rank, optimizer steps per epoch, optimizer steps in the run), as transformers'
    `Trainer._inner_training_loop` counts them; a short last batch is one unless dataloader_drop_last."""
    global_batch = args.per_device_train_batch_size * world_size
    batches = n_examples // global_batch if args.dataloader_drop_last else math.ceil(n_examples / global_batch)
    steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return batches, steps_per_epoch, args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * steps_per_epoch)


def scheduled_lr(args: TrainingConfig, step: int, total_steps: int) -> float:
    """The learning rate of the optimizer step after `step` completed ones (warmup, then the schedule)."""
    warmup = steps_from(args.warmup_steps, total_steps)
    return args.learning_rate * lr_multiplier(step, total_steps, warmup, args.lr_scheduler_type,
                                              **(args.lr_scheduler_kwargs or {}))


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clip the global gradient norm to max_grad_norm (0: no clipping), step, free the gradients; returns the norm
    before clipping (what transformers logs as grad_norm)."""
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frees the memory now rather than at the next backward
    return grad_norm


def due(strategy: str, step: int, every: int, epoch_end: bool) -> bool:
    """After optimizer step `step`: "steps" every `every` steps, "epoch" at the end of each epoch, "no" never."""
    if strategy == "steps":
        return step % every == 0
    return strategy == "epoch" and epoch_end


def save_final(run: Run, models: dict[str, nn.Module], tokenizer) -> None:
    """Each model (subfolder -> model) and the tokenizer into output_dir; every rank calls it, rank 0 writes."""
    weights = {sub: full_model_state(model) for sub, model in models.items()}
    if run.dist.is_main:
        for sub, model in models.items():
            save_pretrained(model, str(Path(run.args.output_dir) / sub), state_dict=weights[sub])
        tokenizer.save_pretrained(run.args.output_dir)
        also = "".join(f" and {sub}/" for sub in models if sub)
        print0(f"[minirlhf] saved the final model{also} to {run.args.output_dir}")
