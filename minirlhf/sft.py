"""Supervised fine-tuning on prompt-completion data: the stage before reward modelling and PPO, as one short loop.

The loss is the mean token cross-entropy over completion tokens, as TRL's SFTTrainer computes it on prompt-completion
data (completion_only_loss): transformers' causal-LM loss summed over the labelled tokens and divided by their number
in the whole optimizer step, over all micro-batches and ranks (`num_items_in_batch`, average_tokens_across_devices).

References: Ouyang et al. 2022 (InstructGPT, the SFT stage); TRL trl/trainer/sft_trainer.py and sft_config.py;
transformers loss_utils.py (ForCausalLMLoss) and trainer.py (`Trainer._inner_training_loop`).

Evaluation (eval_strategy, or do_train = false) logs eval_loss as transformers' `Trainer.evaluation_loop` computes it
for SFTTrainer: each batch's mean completion-token cross-entropy, averaged over examples; with TRL's eval_entropy and
eval_mean_token_accuracy (means over batches), not its eval_num_tokens.

Run: `python -m minirlhf.sft configs/sft.toml [--key value ...]`, or under `torchrun -m`; `--help` lists every key.
Not implemented: packing, padding-free batches, assistant-only loss.
"""

import math
import time
from dataclasses import asdict, dataclass

import torch

from minirlhf.data import collate_sft, prepare_sft_dataset, rank_batches
from minirlhf.infra.config import TrainingConfig, exit_on_bad_input, require
from minirlhf.infra.files import load_rows
from minirlhf.infra.hf import load_pretrained
from minirlhf.infra.lora import LoraArgs, add_lora
from minirlhf.infra.metrics import LogWindow, MetricsLogger
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
from minirlhf.losses import completion_loss, entropy_from_logits, logprobs_from_logits
from minirlhf.model import CausalLM
from minirlhf.optim import set_lr, steps_from


@dataclass
class SFTConfig(LoraArgs, TrainingConfig):
    """Supervised fine-tuning (TRL SFTConfig's defaults for the fields below)."""

    learning_rate: float = 2e-5
    """peak AdamW learning rate (TRL SFTConfig's default)"""
    max_length: int | None = 1024
    """truncate each prompt + completion to this many tokens, keeping the start; None: no limit"""

    def __post_init__(self):
        super().__post_init__()
        require(self.max_length is None or self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")


def main(argv: list[str] | None = None) -> None:
    run = start(SFTConfig, argv)
    args, device, world = run.args, run.dist.device, run.dist.world_size
    per_device, ga = args.per_device_train_batch_size, args.gradient_accumulation_steps
    with exit_on_bad_input():
        model, tokenizer, dataset, eval_dataset = load(args, device)
        if not args.do_train:  # transformers' do_train = False: evaluate model_name_or_path, save no model
            save_eval(run, evaluate(model, eval_dataset, args, run, tokenizer.pad_token_id))
            return
        _, steps_per_epoch, total_steps = count_steps(args, len(dataset), world)
    # Training state, as reward.py's: a position in the epoch's fixed data order, and what the next log averages
    train_model, optimizer, state = prepare(run, model, tokenizer, new_state={
        "step": 0, "epoch": 0, "group": 0, "window": asdict(LogWindow())})
    window = LogWindow(**state["window"])
    logging_steps, eval_steps, save_steps = (steps_from(args.logging_steps, total_steps),
                                             steps_from(args.eval_steps or 1, total_steps),
                                             steps_from(args.save_steps, total_steps))
    print0(f"[minirlhf] {len(dataset)} examples, {total_steps} optimizer steps ({steps_per_epoch} per epoch)")
    logger = MetricsLogger(args, run.dist.is_main, total_steps, state["step"])
    seed = args.seed if args.data_seed is None else args.data_seed
    model.train()

    while state["step"] < total_steps:
        # 1. this epoch's micro-batches for this rank, in groups of gradient_accumulation_steps
        epoch = state["epoch"]
        batches = rank_batches(len(dataset), per_device, seed, epoch, run.dist.rank, world, args.dataloader_drop_last)
        groups = [batches[i : i + ga] for i in range(0, len(batches), ga)]
        for g in range(state["group"], len(groups)):
            # 2. forward/backward each micro-batch; the loss is divided by the completion tokens of the whole step
            micro_batches = [collate_sft([dataset[i] for i in ids], tokenizer.pad_token_id) for ids in groups[g]]
            num_items_in_batch = all_reduce(sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches), "sum")
            step_loss = 0.0
            for i, b in enumerate(micro_batches):
                with gradient_sync(train_model, i == len(micro_batches) - 1):  # ranks average in the last backward
                    labels = b["labels"].to(device)
                    with autocast(device, run.precision):  # each next token's log-prob, no (B, T, vocab) logits
                        logprobs, _ = train_model(b["input_ids"].to(device), b["attention_mask"].to(device),
                                                  targets=labels[:, 1:].clamp(min=0))  # -100 reads id 0, not counted
                    # DDP/FSDP average over ranks; the world_size factor makes it a mean over all ranks' tokens
                    loss = completion_loss(logprobs, labels, num_items_in_batch) * world
                    loss.backward()
                step_loss += loss.item() / world
            # 3. clip, then step with the scheduled learning rate
            lr = scheduled_lr(args, state["step"], total_steps)
            set_lr(optimizer, lr)
            step_loss = all_reduce(torch.tensor(step_loss), "sum").item()
            grad_norm = optimizer_step(run, model, state["step"] + 1, step_loss)  # or stop, or skip
            state["step"] += 1
            window.add(step_loss)
            window.steps += 1
            state["epoch"], state["group"] = (epoch, g + 1) if g + 1 < len(groups) else (epoch + 1, 0)
            logger.update()

            # 4. log (and at the last step), evaluate and save on the transformers schedule
            step, done, epoch_end = state["step"], state["step"] >= total_steps, g + 1 == len(groups)
            first = args.logging_first_step and step == 1
            if due(args.logging_strategy, step, logging_steps, epoch_end) or first or (
                    done and args.logging_strategy != "no"):
                logger.log({"loss": window.pop()["loss"], "grad_norm": grad_norm, "learning_rate": lr,
                            **run.skipped_steps(), "epoch": epoch + (g + 1) / len(groups), "step": step})
            if due(args.eval_strategy, step, eval_steps, epoch_end) or (args.eval_strategy == "steps" and done):
                metrics = evaluate(train_model, eval_dataset, args, run, tokenizer.pad_token_id)
                logger.log({**metrics, "epoch": epoch + (g + 1) / len(groups), "step": step})
            state["window"] = asdict(window)
            checkpoint_or_stop(run, step, due(args.save_strategy, step, save_steps, epoch_end) or (
                args.save_strategy == "steps" and done), state, logger)
            if done:
                break

    # 5. the final model in Hugging Face layout
    logger.close()
    save_final(run, args.model_name_or_path)
    cleanup_distributed()


def load(args: SFTConfig, device: torch.device):
    """The policy to fine-tune, its tokenizer (pad = EOS when it has none, as TRL's SFTTrainer), the training examples
    (none with do_train = false) and the evaluation examples (none without evaluation)."""
    require(args.model_name_or_path is not None, "model_name_or_path", "is required")
    require(args.dataset_name is not None, "dataset_name", "is required")
    tokenizer = Tokenizer.from_pretrained(args.model_name_or_path, revision=args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def examples(split: str, evaluation: bool = False) -> list[dict]:
        source = f"{args.dataset_name} [{split}]"  # evaluation: never the training rows again (a single data file)
        rows, n_dropped = prepare_sft_dataset(load_rows(args.dataset_name, split, evaluation=evaluation), tokenizer,
                                              args.max_length, source=source)
        print0(f"[minirlhf] {source}: {len(rows)} examples, {n_dropped} dropped (no completion token left)")
        return rows

    train_dataset = examples(args.dataset_train_split) if args.do_train else []
    evaluating = args.eval_strategy != "no" or not args.do_train
    eval_dataset = examples(args.dataset_test_split, evaluation=True) if evaluating else []
    model = load_pretrained(CausalLM, args.model_name_or_path, revision=args.model_revision, dtype=args.dtype,
                            device=device, new_model=True)
    model.transformer.gradient_checkpointing = args.gradient_checkpointing
    if args.use_peft:
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    return model, tokenizer, train_dataset, eval_dataset


@torch.no_grad()
def evaluate(model, eval_dataset: list[dict], args: SFTConfig, run: Run, pad_token_id: int) -> dict[str, float]:
    """eval_loss: each batch's mean completion-token cross-entropy, weighted by its examples (transformers'
    evaluation_loop repeats a batch's loss per example, then takes the mean); TRL's eval_entropy and
    eval_mean_token_accuracy over each batch's completion tokens, averaged over batches (SFTTrainer.compute_loss)."""
    start_time, (rank, world), device = time.time(), (run.dist.rank, run.dist.world_size), run.dist.device
    model.eval()
    size = args.per_device_eval_batch_size
    all_batches = [range(i, min(i + size, len(eval_dataset))) for i in range(0, len(eval_dataset), size)]
    batches = all_batches[rank::world]
    loss_sum, history = torch.zeros((), device=device), []
    # Equal rounds on every rank (FSDP gathers weights in each forward): a rank one batch short reruns the first
    # batch and counts nothing of it, as accelerate's gather_for_metrics drops even_batches' repeats.
    for n in range(math.ceil(len(all_batches) / world)):
        spare = n >= len(batches)
        indices = all_batches[0] if spare else batches[n]
        b = collate_sft([eval_dataset[i] for i in indices], pad_token_id)
        labels = b["labels"].to(device)  # (B, T)
        with autocast(device, run.precision):
            logits = model(b["input_ids"].to(device), b["attention_mask"].to(device)).float()  # (B, T, V)
        mask, shift_logits = labels[:, 1:] != -100, logits[:, :-1]  # token t + 1 is predicted at position t
        correct = (shift_logits.argmax(-1) == labels[:, 1:]) & mask
        counts = torch.stack([(entropy_from_logits(shift_logits) * mask).sum(), correct.sum(), mask.sum()])
        entropy_sum, n_correct, n_tokens = all_reduce(counts * (not spare), "sum").tolist()
        history.append((entropy_sum / n_tokens, n_correct / n_tokens))
        if not spare:  # -100 reads id 0 (as in training), a position completion_loss leaves out
            logprobs = logprobs_from_logits(shift_logits, labels[:, 1:].clamp(min=0))  # (B, T - 1)
            loss_sum += completion_loss(logprobs, labels) * len(indices)
    model.train()
    runtime = time.time() - start_time
    return {"eval_loss": (all_reduce(loss_sum, "sum") / len(eval_dataset)).item(), "eval_runtime": runtime,
            "eval_samples_per_second": len(eval_dataset) / runtime, "eval_steps_per_second": len(batches) / runtime,
            "eval_entropy": sum(h[0] for h in history) / len(history),
            "eval_mean_token_accuracy": sum(h[1] for h in history) / len(history)}


if __name__ == "__main__":
    main()
