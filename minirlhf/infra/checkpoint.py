"""Training checkpoints: everything needed to resume exactly, written atomically.

`checkpoint-<step>/` holds the model in Hugging Face layout (transformers loads it as is), the tokenizer, and the
training state: `optimizer.pt` (AdamW moments), `trainer_state.json` (step, epoch, data position, logging
accumulators), `rng_state_<rank>.pth` (Python, NumPy, torch and CUDA generators of every rank) and `config.toml`.
Under FSDP the weights and moments are saved whole, so the files are the same as without it. A LoRA model saves its
adapter in PEFT's layout; its frozen base is loaded again from the starting model on resume.
A checkpoint is written into a temporary folder, its files fsync'ed, and renamed into place, so a crash (even
kill -9) never leaves a half-written `checkpoint-<step>`; the oldest ones of the same run beyond `save_total_limit`
are then renamed away and deleted. trainer_state.json names the trainer and a run id: resuming takes only a
checkpoint of the same kind, and save_total_limit counts only this run's checkpoints.
"""

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minirlhf.infra.hf import load_pretrained, save_pretrained
from minirlhf.infra.lora import load_adapter, lora_layers, save_adapter
from minirlhf.infra.parallel import full_model_state, full_optimizer_state, load_optimizer_state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    state["numpy"]["state"]["key"] = state["numpy"]["state"]["key"].tolist()  # plain ints load with weights_only
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_dirs(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Completed checkpoints in output_dir (of run `run_id` only, if given), oldest (lowest step) first."""
    dirs = [p for p in Path(output_dir).glob("checkpoint-*")
            if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()]
    if run_id is not None:
        dirs = [p for p in dirs if read_state(p).get("run_id", "") == run_id]  # "": saved before run ids
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def read_state(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`; a one-line ValueError naming the file if it is unreadable."""
    file = path / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read trainer state ({e}); resume from another checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{file}: not a minirlhf trainer state (no integer 'step'); resume from another checkpoint")
    return state


def resolve_resume(resume_from_checkpoint, output_dir: str, trainer: str) -> Path | None:
    """A path as given, `True` for the newest checkpoint in output_dir, None/False for a fresh start. The checkpoint
    must be one that `trainer` ("reward", "sft" or "ppo") wrote."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        dirs = checkpoint_dirs(output_dir)
        if not dirs:
            raise ValueError(f"resume_from_checkpoint: no checkpoint-<step> folder in {output_dir}")
        runs = {read_state(p).get("run_id") for p in dirs}
        if len(runs) > 1:  # folders written before run ids, or copied in: which run is meant is not ours to guess
            raise ValueError(f"resume_from_checkpoint: {output_dir} holds checkpoints of {len(runs)} runs; "
                             "give the checkpoint folder's path")
        path = dirs[-1]
    else:
        path = Path(resume_from_checkpoint)
        if not (path / "trainer_state.json").exists():
            raise ValueError(f"resume_from_checkpoint: {path} is not a minirlhf checkpoint (no trainer_state.json)")
    kind = read_state(path).get("trainer", trainer)  # checkpoints from before the field: trust the user
    if kind != trainer:
        raise ValueError(f"resume_from_checkpoint: {path} is a minirlhf.{kind} checkpoint, not a minirlhf.{trainer} "
                         "one")
    return path


def fsync(path: Path) -> None:
    """Flush a file or folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then the folders: a rename into place is only as durable as what it renames."""
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:
        fsync(path)


def remove_tree(path: Path) -> None:
    """Delete a checkpoint folder: renamed away first (atomic), so a crash mid-deletion leaves no partial one."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def save_checkpoint(output_dir, step: int, models: dict, tokenizer, optimizer, state: dict, config_toml: str,
                    rank: int = 0, save_total_limit: int | None = None) -> None:
    """Write checkpoint-<step> atomically. `models` maps a subfolder ("" = the checkpoint itself) to a model.

    Every rank calls this (each saves its own RNG state); rank 0 writes the rest and renames the folder. An OSError
    on any rank (a full disk) is raised on every rank (`agreed`), with nothing renamed into place.
    """
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    with agreed():
        if rank == 0:
            for stale in [*output_dir.glob(".tmp-checkpoint-*"), *output_dir.glob(".deleting-checkpoint-*")]:
                shutil.rmtree(stale, ignore_errors=True)  # what a crash (kill -9) mid-save or mid-deletion left
            tmp.mkdir(parents=True)
    with agreed(), open(tmp / f"rng_state_{rank}.pth", "wb") as f:  # a file object: a failed write is an OSError
        torch.save(rng_state(), f)
    weights = {sub: full_model_state(model) for sub, model in models.items()}  # collectives when FSDP-sharded
    optimizer_state = full_optimizer_state(optimizer)
    with agreed():
        if rank == 0:
            for sub, model in models.items():
                save_weights(model, tmp / sub, weights[sub])
            tokenizer.save_pretrained(str(tmp))
            with open(tmp / "optimizer.pt", "wb") as f:  # a file object: a full disk shows its OSError
                torch.save(optimizer_state, f)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            (tmp / "config.toml").write_text(config_toml)
    with agreed():
        if rank == 0:
            fsync_tree(tmp)
            if final.exists():  # re-saving the same step (e.g. after a stop signal) replaces the old copy
                remove_tree(final)
            os.replace(tmp, final)
            fsync(output_dir)  # the rename itself
            if save_total_limit:  # only this run's: another run's checkpoints are not ours to delete
                for old in checkpoint_dirs(output_dir, state.get("run_id"))[:-save_total_limit]:
                    remove_tree(old)


class OtherRankFailed(OSError):
    """Raised on the ranks whose own part of a save succeeded while another rank's failed (that rank says why)."""


@contextlib.contextmanager
def agreed():
    """One rank's part of a save, then, in place of a barrier, one all-reduced flag: did any rank's writes fail? If
    so every rank raises (its own OSError, or OtherRankFailed), so that a full disk on one rank stops them all at
    this point instead of leaving the others waiting forever at the next collective. In one process: the body."""
    failure = None
    try:
        yield
    except OSError as e:
        failure = e
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        failed = torch.tensor(float(failure is not None), device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and failure is None:
            failure = OtherRankFailed("another rank could not write its part")
    if failure is not None:
        raise failure


def save_weights(model, folder: Path, state_dict: dict) -> None:
    """A model in Hugging Face layout, or a LoRA model's adapter (and score head) alone: its base never changes."""
    if lora_layers(model):
        save_adapter(model, folder, base_model_path=None)  # the base: config.toml's path
    else:
        save_pretrained(model, str(folder), state_dict=state_dict)


def load_checkpoint_weights(path: Path, models: dict) -> None:
    """Each model (subfolder -> model, as save_checkpoint takes them) from checkpoint `path`, over the starting
    weights (so that a new score head drew the same random numbers as in the first run); into a LoRA model, its
    adapter."""
    for sub, model in models.items():
        if lora_layers(model):
            load_adapter(model, path / sub)
            continue
        if (path / sub / "adapter_model.safetensors").exists():
            raise ValueError(f"{path / sub}: holds a LoRA adapter, not a model: resume it with use_peft = true")
        param = next(model.parameters())
        trained = load_pretrained(type(model), str(path / sub), dtype=param.dtype, device=param.device)
        try:
            model.load_state_dict(trained.state_dict())
        except RuntimeError as e:  # another architecture or size: the first line names the tensor
            raise ValueError(f"{path / sub}: does not fit this model ({str(e).splitlines()[-1].strip()})") from None


def load_checkpoint(path: Path, optimizer, rank: int = 0) -> dict:
    """Restore the optimizer and this rank's RNG state; return trainer_state (the weights: load_checkpoint_weights).
    A missing or corrupt file is a one-line ValueError naming it."""
    state = read_state(path)
    try:
        load_optimizer_state(optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    except Exception as e:  # unreadable, truncated, or the moments of other parameters (another model or trainer)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path / 'optimizer.pt'}: cannot restore the optimizer ({reason})") from None
    rng_file = path / f"rng_state_{rank}.pth"
    if rng_file.exists():
        try:
            set_rng_state(torch.load(rng_file, weights_only=True))
        except Exception as e:
            raise ValueError(f"{rng_file}: cannot restore the random state ({type(e).__name__})") from None
    else:  # e.g. resumed on more ranks than saved: the run goes on, but not bit for bit
        print(f"[minirlhf] rank {rank}: {rng_file} is missing; random state not restored, the run will not repeat "
              "the original exactly", flush=True)
    return state
