"""A run's lifecycle, the same for reward, SFT and PPO, so that each entry point shows only what is its own.

Every `main()` reads: config -> `start` (parse, join the ranks, seed, precision, find the checkpoint) -> load its
models and data -> `prepare` (resume the weights, shard or wrap, AdamW, resume its state) -> its loop, with
`scheduled_lr`, `optimizer_step`, `due` and `checkpoint_or_stop` -> `save_final`. References: transformers 5.23
trainer.py (`Trainer._inner_training_loop`) and trainer_callback.py (`DefaultFlowCallback`).

What keeps a run's work safe (docs/reliability.md): an output_dir holding another run is resumed or refused before
anything is loaded, never silently mixed with (`check_output_dir`), and the same command run again on its finished run
does nothing (`finished`); SIGTERM/SIGINT end the run at a step boundary with a checkpoint
(`StopSignal`); a non-finite loss or gradient norm stops the run before anything of it is saved, or skips that
optimizer step (`optimizer_step`, `check_finite`; PPO: `ppo_update`); a failed save exits 2 on every rank.
"""

import contextlib
import copy
import errno
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minirlhf.infra.checkpoint import (
    OtherRankFailed,
    agreed,
    checkpoint_dirs,
    load_checkpoint,
    load_checkpoint_weights,
    read_state,
    resolve_resume,
    save_checkpoint,
)
from minirlhf.infra.config import (
    TrainingConfig,
    changed_keys,
    config_to_toml,
    exit_on_bad_input,
    module_name,
    parse_config_or_exit,
    require,
    save_config,
)
from minirlhf.infra.hf import save_pretrained
from minirlhf.infra.lora import merged, save_adapter
from minirlhf.infra.parallel import (
    Dist,
    all_reduce,
    cleanup_distributed,
    distribute,
    full_model_state,
    full_tensor,
    init_distributed,
    print0,
    tell_launcher,
)
from minirlhf.model import Attention
from minirlhf.optim import AdamW, lr_multiplier, param_groups, steps_from


class StopSignal:
    """SIGTERM (pre-emption) or SIGINT (Ctrl-C): the loop finishes its optimizer step, saves a checkpoint and exits
    with 128 + the signal number (143, 130), so that a scheduler or `sft && reward` sees an unfinished run. A second
    signal, or one before the loop has started, exits at once; saves are atomic, so the last good checkpoint stays.
    A repeat within a second is the same request: torchrun forwards what it gets (SIGTERM, SIGINT) to its workers,
    which a scheduler or a terminal signalled directly too; it then waits 30 s before it kills them. Only the main
    thread may install handlers (an in-process caller on another thread gets none)."""

    def __init__(self):
        self.signum, self.in_loop, self.first = None, False, 0.0
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(signum, self.handle)
            except ValueError:  # not the main thread
                return

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and time.monotonic() - self.first < 1:
            return
        if self.signum is not None or not self.in_loop:
            print(f"[minirlhf] {name}: exiting at once; checkpoints already written are complete", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signum, self.first = signum, time.monotonic()
        print0(f"[minirlhf] {name}: finishing this step, then saving a checkpoint (send it again to exit at once)")

    def requested(self, device: torch.device) -> bool:
        """Whether any rank got a signal: one all-reduced flag per step, so that every rank stops at the same step."""
        return all_reduce(torch.tensor(float(self.signum is not None), device=device), "max").item() > 0


@dataclass
class Run:
    """A started run: its config, its process (rank, world size, device), the autocast dtype (None: fp32), the
    checkpoint it resumes from (None: a fresh start), the trainer ("reward", "sft", "ppo"), the run id written
    into its checkpoints, and its config as given (before loading filled anything in: what config.toml records)."""

    args: TrainingConfig
    dist: Dist
    precision: torch.dtype | None
    resume: Path | None
    trainer: str
    run_id: str
    stop: StopSignal
    given: TrainingConfig
    skipped: int = 0  # updates dropped for a non-finite loss or gradient (on_nonfinite = "skip")
    models: dict[str, nn.Module] | None = None  # set by prepare: what checkpoints hold, by subfolder ("": the root)
    tokenizer: object = None  # set by prepare: saved beside the models
    optimizer: AdamW | None = None  # set by prepare

    def skipped_steps(self) -> dict[str, int]:
        """What a log record adds under on_nonfinite = "skip" once a step was dropped."""
        return {"skipped_steps": self.skipped} if self.skipped else {}


def start(config_class: type, argv: list[str] | None) -> Run:
    """Parse, join the ranks and check output_dir, all before anything is loaded: the same command run again on its
    finished run says so and exits 0 (as make does); an output_dir holding another run is refused in one line."""
    stop = StopSignal()  # from the start: Ctrl-C while loading exits with one line, not a traceback
    args = parse_config_or_exit(config_class, argv)
    dist = init_distributed()
    trainer = module_name(config_class).rpartition(".")[2]
    # a checkpoint path asks to redo the steps after it; true (the newest checkpoint) has nothing left to do
    if (args.do_train and args.resume_from_checkpoint in (None, False, True) and not args.overwrite_output_dir
            and finished(args)):
        print0(f"[minirlhf] {args.output_dir} already holds this finished run (same config); nothing to do")
        cleanup_distributed()
        raise SystemExit(0)
    with exit_on_bad_input():
        # FSDP shards over the processes torchrun starts; in a plain process it is a config error
        require(not args.fsdp or torch.distributed.is_initialized(), "fsdp",
                "needs several processes: launch with torchrun --nproc_per_node=N, or leave fsdp unset")
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, trainer)
        run_id = read_state(resume).get("run_id", "") if resume else uuid.uuid4().hex  # "": saved before run ids
        if args.do_train:  # an evaluation writes eval_results.json alone, beside whatever output_dir holds
            check_output_dir(args, run_id if resume else None)
        check_writable(args.output_dir)
    seed_everything(args.seed)  # before loading: a new score head is the first random draw (huggingface/trl#4887)
    return Run(args, dist, resolve_precision(args.bf16, args.fp16, dist.device), resume, trainer, run_id, stop,
               given=copy.copy(args))


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices), as transformers.set_seed does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(bf16: bool | None, fp16: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. TRL's default bf16=None means "bf16 if the hardware has it".

    Departure from TRL, whose _BaseConfig defaults to bf16=True and crashes on CPU: on CPU the automatic choice is fp32
    (exact parity, and what TRL users get with use_cpu=True and bf16=False); bf16=true asks for CPU autocast.
    """
    if fp16:
        return torch.float16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        print0(f"[minirlhf] bf16 not set: using {'bf16' if bf16 else 'fp32'} on {device.type}")
    return torch.bfloat16 if bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed-precision context for forward passes; a no-op in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_writable(output_dir: str) -> None:
    """output_dir must be a folder we can write in, or create (found now, not at the first save an hour later). It is
    not created here but once everything has loaded (prepare), so a start that fails leaves no empty folder behind."""
    path = Path(output_dir).absolute()
    nearest = next(p for p in (path, *path.parents) if p.exists())  # the folder that will hold the new ones
    try:
        if not nearest.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(nearest))
        tempfile.TemporaryFile(dir=nearest).close()
    except OSError as e:
        raise ValueError(f"output_dir: cannot write to {output_dir} ({e.strerror or e})") from None


FINISHED = "# finished: the final model in this folder is this config's"  # config.toml's last line, by save_final
# keys that say how a run starts or shows its progress, not what it computes or saves
HOW_STARTED = ("resume_from_checkpoint", "overwrite_output_dir", "disable_tqdm")


def final_model(output_dir: str | Path) -> list[str]:
    """The final model's weights in output_dir (a full model's, or a LoRA run's adapter), by file name."""
    patterns = ("model*.safetensors*", "adapter_model.safetensors")
    return [p.name for pattern in patterns for p in Path(output_dir).glob(pattern)]


def saved_config(output_dir: str | Path) -> str | None:
    """output_dir/config.toml as text (compared, never parsed or acted on), or None if there is none to read."""
    try:
        return (Path(output_dir) / "config.toml").read_text()
    except (OSError, UnicodeDecodeError):
        return None


def finished(args: TrainingConfig) -> bool:
    """Whether output_dir holds the final model of a run of this very config: config.toml there ends with save_final's
    FINISHED line and differs from `args` in no key but how the run was started (HOW_STARTED)."""
    saved, config = saved_config(args.output_dir), config_to_toml(args)
    return (saved is not None and saved.endswith(FINISHED + "\n") and bool(final_model(args.output_dir))
            and saved.partition("\n")[0] == config.partition("\n")[0]  # the trainer, in the first line
            and not changed_keys(saved, config, ignore=HOW_STARTED))


def check_output_dir(args: TrainingConfig, run_id: str | None) -> None:
    """output_dir must hold no other run (checkpoints of another run id, or a final model on a fresh start) unless
    overwrite_output_dir: a fresh run must neither delete a finished run's work nor mix its checkpoints with its own
    (resume_from_checkpoint = true would then pick the other run's). The refusal says what is there, from the
    config.toml beside it, and advises a resume only where there is a checkpoint to resume from."""
    output_dir = Path(args.output_dir)
    others = [p.name for p in checkpoint_dirs(output_dir) if read_state(p).get("run_id", "") != run_id]
    final = final_model(output_dir) if run_id is None else []
    if not (others or final) or args.overwrite_output_dir:
        return
    found = ", ".join([*others[-2:], *final[:1]])
    saved, config = saved_config(output_dir), config_to_toml(args)
    if run_id is not None:  # resuming this run among another's checkpoints
        what = f"another run's checkpoints ({found})"
    elif saved is None or not saved.startswith("# minirlhf."):
        what = f"another run ({found})"
    elif saved.partition("\n")[0] != config.partition("\n")[0]:  # "# minirlhf.sft.SFTConfig ...": another trainer
        what = f"a {saved.split()[1].rpartition('.')[0]} run ({found})"
    else:
        done, keys = saved.endswith(FINISHED + "\n"), changed_keys(saved, config, ignore=HOW_STARTED)
        listed = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        if keys:
            what = f"{'a finished run' if done else 'a run'} with a different config (keys: {listed})"
        else:
            what = f"{'this finished run' if done else 'an unfinished run of this config'} ({found})"
    resume = ("continue it with --resume_from_checkpoint=true (or a checkpoint path), " if others and run_id is None
              else "")
    deletes = ", which deletes its checkpoints" if others else ""
    raise ValueError(f"output_dir: {output_dir} holds {what}; {resume}start afresh with --overwrite_output_dir=true"
                     f"{deletes}, or choose another output_dir")


def prepare(run: Run, model: nn.Module, tokenizer, new_state: dict, saved: dict[str, nn.Module] | None = None,
            sharded: tuple[nn.Module, ...] = ()):
    """(the module the loop calls, the optimizer over `model`, trainer_state: new_state on a fresh start, else the
    checkpoint's). `saved` maps each checkpoint subfolder to its model ("" = the checkpoint itself; default: `model`
    there); `sharded`: the models to shard (FSDP); a resumed trainer_state must have every key of `new_state`."""
    args = run.args
    run.models, run.tokenizer = saved or {"": model}, tokenizer
    if run.resume is not None:
        with exit_on_bad_input():
            load_checkpoint_weights(run.resume, run.models)  # before sharding: whole tensors into whole parameters
    if run.dist.device.type == "cpu":
        attention_in_fp32_under_autocast(model, *sharded)
    train_model = distribute(model, args.fsdp, sharded)
    run.optimizer = AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate,
                          betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    state = new_state
    if run.resume is not None:
        with exit_on_bad_input():
            state = load_checkpoint(run.resume, run.optimizer, run.dist.rank)
            missing = sorted(set(new_state) - set(state))  # e.g. a checkpoint of an older minirlhf
            require(not missing, "resume_from_checkpoint", f"{run.resume}: trainer_state.json has no {missing}: not "
                    f"a minirlhf.{run.trainer} checkpoint of this version")
        run.skipped = state.get("skipped_steps", 0)
        print0(f"[minirlhf] resumed from {run.resume} at step {state['step']}")
    if run.dist.is_main:
        # everything loaded: only now may an overwritten run's checkpoints go (a bad input leaves them be)
        for old in checkpoint_dirs(args.output_dir) if args.overwrite_output_dir else []:
            if read_state(old).get("run_id", "") != run.run_id:
                shutil.rmtree(old)
                print0(f"[minirlhf] overwrite_output_dir: deleted {old}")
        save_config(args, Path(args.output_dir) / "config.toml", given=run.given)  # creates output_dir
    run.stop.in_loop = True
    return train_model, run.optimizer, state


def attention_in_fp32_under_autocast(*models: nn.Module) -> None:
    """Under CPU autocast, each attention's scaled_dot_product_attention runs in fp32 (the projections stay bf16):
    torch's CPU flash attention is ~6x slower in bf16 than in fp32 (backward) and reads a cache kept in the weights'
    dtype. Set on each Attention instance, so that model.py keeps the plain call."""
    for model in models:
        for module in model.modules():
            if isinstance(module, Attention) and "attend" not in vars(module):
                module.attend = functools.partial(_attend_in_fp32, module.attend)


def _attend_in_fp32(attend, q, k, v, *args, **kwargs):
    if not torch.is_autocast_enabled("cpu"):
        return attend(q, k, v, *args, **kwargs)
    with torch.autocast("cpu", enabled=False):
        return attend(q.float(), k.float(), v.float(), *args, **kwargs)


def count_steps(args: TrainingConfig, n_examples: int, world_size: int) -> tuple[int, int, int]:
    """(batches per epoch per rank, optimizer steps per epoch, optimizer steps in the run), as transformers'
    `Trainer._inner_training_loop` counts them; a short last batch is one unless dataloader_drop_last. No batch at all
    (an empty or all-filtered dataset) is a ValueError: the loop would never reach a step."""
    global_batch = args.per_device_train_batch_size * world_size
    batches = n_examples // global_batch if args.dataloader_drop_last else math.ceil(n_examples / global_batch)
    if batches == 0:
        raise ValueError(f"{args.dataset_name}: {n_examples} training examples, fewer than one batch of {global_batch}"
                         " (per_device_train_batch_size * ranks; rows over max_length are dropped)")
    steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return batches, steps_per_epoch, args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * steps_per_epoch)


def scheduled_lr(args: TrainingConfig, step: int, total_steps: int) -> float:
    """The learning rate of the optimizer step after `step` completed ones (warmup, then the schedule)."""
    warmup = steps_from(args.warmup_steps, total_steps)
    return args.learning_rate * lr_multiplier(step, total_steps, warmup, args.lr_scheduler_type,
                                              **(args.lr_scheduler_kwargs or {}))


def optimizer_step(run: Run, model: nn.Module, step: int, loss: float) -> float:
    """Clip the global gradient norm to max_grad_norm (0: no clipping), step, free the gradients; returns the norm
    before clipping (what transformers logs as grad_norm). `step`: the number of this step (from 1); `loss`: its loss
    over all ranks. A non-finite loss or norm (the same on every rank) goes to check_finite: under "skip" the update is
    dropped and counted in run.skipped."""
    max_norm = run.args.max_grad_norm if run.args.max_grad_norm > 0 else math.inf
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)).item()
    if check_finite(run, step, {"loss": loss, "grad_norm": grad_norm}):
        run.optimizer.step()
    run.optimizer.zero_grad()  # frees the memory now rather than at the next backward
    return grad_norm


def check_finite(run: Run, step: int | str, values: dict[str, float | torch.Tensor],
                 can_skip: bool = True) -> bool:
    """True if every value (a float, or a scalar tensor left on its device) is finite on every rank: one all-reduced
    flag, the only host sync, the values themselves read only when one is not. Otherwise, under on_nonfinite = "stop"
    or when the step is already taken (not `can_skip`), say which at which step and exit 1 before anything of this
    step is saved; under "skip", count it in run.skipped and return False (the caller drops the step)."""
    values = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in values.items()}  # FSDP: whole
    finite = torch.stack([torch.as_tensor(v, device=run.dist.device).isfinite() for v in values.values()]).all()
    if all_reduce((~finite).float(), "max").item() == 0:
        return True
    bad = [f"{k} = {float(v)}" for k, v in values.items() if not math.isfinite(v)]
    what = ", ".join(bad) or "a value on another rank"
    if run.args.on_nonfinite == "skip" and can_skip:
        run.skipped += 1
        print0(f"[minirlhf] step {step}: {what}; skipped this optimizer step ({run.skipped} so far)")
        return False
    last = checkpoint_dirs(run.args.output_dir, run.run_id)
    skip = ', or set on_nonfinite = "skip"' if can_skip else ""  # skipping cannot undo a step already taken
    message = (f"error: step {step}: {what}; stopped without saving (last checkpoint: {last[-1] if last else 'none'}); "
               f"lower learning_rate{skip}")
    print0(message, file=sys.stderr)
    tell_launcher(message)
    cleanup_distributed()
    raise SystemExit(1)


def due(strategy: str, step: int, every: int, epoch_end: bool) -> bool:
    """After optimizer step `step`: "steps" every `every` steps, "epoch" at the end of each epoch, "no" never."""
    if strategy == "steps":
        return step % every == 0
    return strategy == "epoch" and epoch_end


def check_update(run: Run, update: int, model: nn.Module) -> None:
    """PPO, after an update's optimizer steps (each checked before it is taken, in ppo_update): check_finite over the
    sum of the weights (this rank's shards under FSDP), nan or inf when any weight has blown up (finite gradients, a
    huge learning rate), so that none is saved. The steps are taken: this stops under either on_nonfinite."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    weights = torch.stack([p.detach().float().sum() for p in local]).sum()
    check_finite(run, update, {"weights": weights}, can_skip=False)


def checkpoint_or_stop(run: Run, step: int, scheduled: bool, state: dict, logger) -> None:
    """After optimizer step (PPO: update) `step`: save checkpoint-<step> when `scheduled` or when any rank got
    SIGTERM/SIGINT (one all-reduced flag), and then say where and exit 128 + the signal number. Every rank calls it;
    a full disk or another OS error: one line, the temporary folder removed, exit 2, the checkpoints before intact."""
    unit = "update" if run.trainer == "ppo" else "step"  # what each trainer's log counts
    stopping = run.stop.requested(run.dist.device)
    if stopping or scheduled:
        with exit_on_os_error(f"checkpoint-{step}", Path(run.args.output_dir) / f".tmp-checkpoint-{step}"):
            save_checkpoint(run.args.output_dir, step, run.models, run.tokenizer, run.optimizer,
                            {**state, "trainer": run.trainer, "run_id": run.run_id, "skipped_steps": run.skipped},
                            config_to_toml(run.args), run.dist.rank, run.args.save_total_limit)
    if stopping:
        logger.close()
        signum = run.stop.signum or signal.SIGTERM
        print0(f"[minirlhf] stopped by {signal.Signals(signum).name} after {unit} {step}: saved "
               f"{Path(run.args.output_dir) / f'checkpoint-{step}'}; continue with --resume_from_checkpoint=true")
        cleanup_distributed()
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def exit_on_os_error(what: str, tmp: Path):
    """Around a save: an OS error (a full disk, a vanished mount) prints one line and exits 2, after removing the
    temporary folder or file `tmp`; what was saved before is intact, the saves being atomic. torch.save reports a failed
    write as a RuntimeError raised while handling the OSError, so the OSError is looked for in the chain. Under
    torchrun every rank learns of a failure on any rank (checkpoint.agreed) and exits 2; the failing rank says why."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if not isinstance(error, OtherRankFailed):
            cause = f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}"
            message = (f"error: output_dir: cannot save {what} in {tmp.parent} ({cause}); what was saved before is "
                       "intact")
            print(message, file=sys.stderr, flush=True)
            tell_launcher(message)
        cleanup_distributed()
        raise SystemExit(2) from None


def save_final(run: Run, base_model_path: str) -> None:
    """The models (run.models) and the tokenizer into output_dir; every rank calls it, rank 0 writes. A LoRA run
    (use_peft) saves its adapter in PEFT's layout (adapter_config.json names `base_model_path`) and the merged model
    with the tokenizer in merged/. Last, config.toml is marked FINISHED: the same command run again has nothing to do.
    Under torchrun every rank learns whether rank 0 could (checkpoint.agreed), so that a full disk there exits 2 on
    all."""
    run.stop.in_loop = False  # a signal now exits at once: the saves below are atomic, the last checkpoint complete
    models = dict(run.models)
    if run.args.use_peft:
        models = {"merged": merged(models.pop("")), **models}
    weights = {sub: full_model_state(model) for sub, model in models.items()}
    for sub, model in models.items():
        folder = Path(run.args.output_dir) / sub
        with exit_on_os_error("the final model", folder / ".tmp-save"), agreed():
            if run.dist.is_main:
                save_pretrained(model, str(folder), state_dict=weights[sub])
    for sub in ("", "merged") if run.args.use_peft else ("",):  # merged/ is a whole model: transformers needs both
        tmp = Path(run.args.output_dir) / sub / ".tmp-tokenizer"
        with exit_on_os_error("the tokenizer", tmp), agreed():
            if run.dist.is_main:  # written aside, then renamed into place, as save_pretrained does the model's files
                shutil.rmtree(tmp, ignore_errors=True)
                run.tokenizer.save_pretrained(tmp)
                for file in tmp.iterdir():
                    os.replace(file, tmp.parent / file.name)
                tmp.rmdir()
    if run.args.use_peft and run.dist.is_main:
        save_adapter(run.models[""], run.args.output_dir, base_model_path)
    config, tmp = Path(run.args.output_dir) / "config.toml", Path(run.args.output_dir) / ".tmp-config.toml"
    with exit_on_os_error("config.toml", tmp), agreed():
        if run.dist.is_main:  # renamed into place: a crash leaves the unmarked file, never half a line
            tmp.write_text(config_to_toml(run.args, run.given) + FINISHED + "\n")
            os.replace(tmp, config)
    also = "".join(f" and {sub}/" for sub in models if sub)
    print0(f"[minirlhf] saved the final model{also} to {run.args.output_dir}")


def save_eval(run: Run, metrics: dict[str, float]) -> None:
    """do_train = false: print the evaluation and write it to output_dir/eval_results.json, as transformers' example
    scripts do (`trainer.save_metrics("eval", metrics)`: indent 4, sorted keys); rank 0 writes, nothing else."""
    if run.dist.is_main:
        print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        path = Path(run.args.output_dir) / "eval_results.json"
        tmp = path.with_name(".tmp-eval_results.json")
        with exit_on_os_error("eval_results.json", tmp):  # written aside, then renamed: never half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(metrics, indent=4, sort_keys=True) + "\n")
            os.replace(tmp, path)
    cleanup_distributed()
