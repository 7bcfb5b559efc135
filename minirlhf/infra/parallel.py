"""Several ranks training one model: processes and collectives, DDP wrapping, FSDP2 sharding, and whole tensors out
of shards.

A first reading can skip this file: in one process every function here is a no-op or the identity.
`init_distributed()` reads torchrun's environment; without it the same code runs as one plain process, and only
rank 0 prints (`print0`). Under DDP (the
default with torchrun) every rank holds the whole model. Under FSDP2 (`fsdp = "full_shard"` or "shard_grad_op",
Rajbhandari et al. 2020's ZeRO-3 / ZeRO-2) each rank holds 1/world_size of every parameter, gradient and AdamW
moment, gathered per unit for its forward and backward; with " auto_wrap" each transformer block is its own unit,
without it the whole model is one, as in transformers. Checkpoints hold whole tensors, whatever the sharding.
"""

import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """One process per device under torchrun (nccl on CUDA, gloo on CPU); a single process otherwise."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, local_rank, world, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be saving
        # Free unreachable objects that may still hold tensors of finished gloo work, then destroy the group while
        # Python is fully alive: left to interpreter exit, or destroyed with those objects alive, gloo aborted a rank
        # now and then on torch 2.13 CPU ("terminate called without an active exception"; pytorch/pytorch#179291).
        # Two-rank PPO test runs: 3 of 20 aborted without destroy, 1 of 20 with it, 0 of 60 this way.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def tell_launcher(message: str) -> None:
    """Under torchrun, put this rank's one-line error where torchrun's failure summary reads it (the file
    TORCHELASTIC_ERROR_FILE names), so that the summary's root cause is the line itself, not "To enable traceback
    see ..."; torchrun still adds its own summary and exits 1. Nothing without torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        extra = {"py_callstack": message, "timestamp": str(int(time.time()))}
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": extra}}, f)


def all_reduce(t: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Mean, sum, min or max of a tensor over ranks (identity in a single process)."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    ops = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dist.all_reduce(t, op=ops[op])
    return t / dist.get_world_size() if op == "mean" else t


def gather(t: torch.Tensor) -> torch.Tensor:
    """A tensor from every rank, concatenated along dim 0 (accelerate's gather_for_metrics); identity in one process."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def reshards_after_forward(fsdp: str) -> bool:
    """"full_shard" (ZeRO-3) frees gathered parameters after each forward; "shard_grad_op" (ZeRO-2) keeps them."""
    return fsdp.split()[0] == "full_shard"


def shard_model(model: torch.nn.Module, fsdp: str) -> None:
    """FSDP2, in place: with auto_wrap each transformer block is one unit and the embeddings, final norm and head a
    last one; gradients are averaged over ranks and kept sharded. Build the optimizer afterwards: the parameters
    become DTensor shards."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # here: the import takes ~0.6 s

    reshard = reshards_after_forward(fsdp)
    if "auto_wrap" in fsdp.split():
        for block in model.transformer.blocks:
            fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    if hasattr(model, "token_scores"):  # PPO's value and reward models are called through it, not forward()
        register_fsdp_forward_method(model, "token_scores")
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    print0(f"[minirlhf] FSDP2 {fsdp}: rank 0 holds {local:,} of {total:,} parameters")


def distribute(model: torch.nn.Module, fsdp: str | None, sharded: tuple[torch.nn.Module, ...] = ()):
    """The module the training loop calls: `model` itself in one process, DDP-wrapped on several ranks, or with
    fsdp `model` after sharding each of `sharded` (default: `model` alone) in place. Build the optimizer after."""
    if fsdp:
        for m in sharded or (model,):
            shard_model(m, fsdp)
        return model
    return DDP(model) if dist.is_initialized() and dist.get_world_size() > 1 else model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's forward and backward: gradients are averaged over ranks only when `sync`, on
    the last micro-batch of an optimizer step. DDP defers with no_sync(); FSDP2 with set_requires_gradient_sync."""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if sync else model.no_sync()
    if dist.is_initialized():  # FSDP runs under torchrun only; a plain process skips the slow import
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_requires_gradient_sync(sync, recurse=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered_weights(model: torch.nn.Module, fsdp: str | None):
    """An FSDP model's whole weights on every rank for a stretch of forwards (TRL's ds3_gather_for_generation): token
    by token sampling gathers once, not per token, and each rank stops when its rows are done. No-op without FSDP."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(reshards_after_forward(fsdp), recurse=False)
            m.reshard()


def is_shard(t) -> bool:
    """Whether t is an FSDP shard (a DTensor). Only FSDP makes them, and importing torch.distributed.tensor pulls in
    sympy (~40 MB of resident memory), so a process that never imported it holds none."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t):
    """An FSDP shard (DTensor) gathered whole, on CPU; anything else as it is. A collective: every rank calls it for
    the same tensors in the same order, one at a time, so an accelerator never holds more than one whole tensor."""
    return t.full_tensor().cpu() if is_shard(t) else t


def full_model_state(model: torch.nn.Module) -> dict:
    return {name: full_tensor(t) for name, t in model.state_dict().items()}


def full_optimizer_state(optimizer) -> dict:
    state = optimizer.state_dict()
    return {**state, "state": {i: {k: full_tensor(v) for k, v in s.items()} for i, s in state["state"].items()}}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a full optimizer state, each moment sharded like its parameter where the model is FSDP-sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict()'s numbering
    for i, param_state in state["state"].items():
        param = params[i]
        if is_shard(param):
            from torch.distributed.tensor import distribute_tensor

            for key, value in param_state.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    param_state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    optimizer.load_state_dict(state)
