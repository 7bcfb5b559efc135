"""Training checkpoints: everything needed to resume exactly, written atomically.

`checkpoint-<step>/` holds the model in Hugging Face layout (transformers loads it as is), the tokenizer, and the
training state: `optimizer.pt` (AdamW moments), `trainer_state.json` (step, epoch, data position, logging
accumulators), `rng_state_<rank>.pth` (Python, NumPy, torch and CUDA generators of every rank) and `config.toml`.
Under FSDP the weights and moments are gathered and saved whole, so the files are the same as without it.
A checkpoint is written into a temporary folder and renamed into place, so a crash never leaves a half-written
`checkpoint-<step>` behind; the oldest ones beyond `save_total_limit` are then deleted. This is not the same thing as
a Hugging Face export (nanochat keeps them apart too): the export is only the model folder.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minirlhf.hf import load_pretrained, save_pretrained
from minirlhf.parallel import full_model_state, full_optimizer_state, load_optimizer_state


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


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Completed checkpoints in output_dir, oldest (lowest step) first."""
    dirs = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume_from_checkpoint, output_dir: str) -> Path | None:
    """A path as given, `True` for the newest checkpoint in output_dir, None/False for a fresh start."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        dirs = checkpoint_dirs(output_dir)
        if not dirs:
            raise ValueError(f"resume_from_checkpoint: no checkpoint-<step> folder in {output_dir}")
        return dirs[-1]
    path = Path(resume_from_checkpoint)
    if not (path / "trainer_state.json").exists():
        raise ValueError(f"resume_from_checkpoint: {path} is not a minirlhf checkpoint (no trainer_state.json)")
    return path


def save_checkpoint(output_dir, step: int, models: dict, tokenizer, optimizer, state: dict, config_toml: str,
                    rank: int = 0, save_total_limit: int | None = None) -> None:
    """Write checkpoint-<step> atomically. `models` maps a subfolder ("" = the checkpoint itself) to a model.

    Every rank calls this (each saves its own RNG state); rank 0 writes the rest and renames the folder.
    """
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    distributed = dist.is_initialized()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pth")
    weights = {sub: full_model_state(model) for sub, model in models.items()}  # collectives when FSDP-sharded
    optimizer_state = full_optimizer_state(optimizer)
    if rank == 0:
        for sub, model in models.items():
            save_pretrained(model, str(tmp / sub), state_dict=weights[sub])
        tokenizer.save_pretrained(str(tmp))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "config.toml").write_text(config_toml)
    if distributed:
        dist.barrier()
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. the final step) replaces the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    if distributed:
        dist.barrier()


def load_checkpoint_weights(path: Path, models: dict) -> None:
    """Each model (subfolder -> model, as save_checkpoint takes them) from checkpoint `path`, over the starting
    weights (so that a new score head drew the same random numbers as in the first run)."""
    for sub, model in models.items():
        param = next(model.parameters())
        trained = load_pretrained(type(model), str(path / sub), dtype=param.dtype, device=param.device)
        model.load_state_dict(trained.state_dict())


def load_checkpoint(path: Path, optimizer, rank: int = 0) -> dict:
    """Restore the optimizer and this rank's RNG state; return trainer_state (the weights: load_checkpoint_weights)."""
    load_optimizer_state(optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    rng_file = path / f"rng_state_{rank}.pth"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
