"""What every entry point needs around its loop: processes and devices, seeding, precision, collectives, logging.

`init_distributed()` reads torchrun's environment; without it the same code runs as one plain process. Only rank 0
prints and writes: metrics go to output_dir/metrics.jsonl (TRL's keys), the console and optionally TensorBoard.
"""

import contextlib
import gc
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


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


def module_name(cls: type) -> str:
    """"minirlhf.reward" for RewardConfig, also under `python -m` (where Python names the module "__main__")."""
    spec = getattr(sys.modules[cls.__module__], "__spec__", None)
    return spec.name if cls.__module__ == "__main__" and spec is not None else cls.__module__


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


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


def keep_records_up_to(path: Path, step: int) -> None:
    """Keep the records of a JSON-lines log up to `step`: a fresh run (step 0) starts it anew, and a resumed run drops
    what the interrupted one logged after its checkpoint (and a line cut off by a crash), so no step appears twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines() if step else []:
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
    path.write_text("".join(kept))


class MetricsLogger:
    """Rank 0 writes each log event to metrics.jsonl, the console (via tqdm) and optionally TensorBoard."""

    def __init__(self, args, is_main: bool, total_steps: int, done_steps: int = 0):
        """`args`: a TrainingConfig (output_dir, report_to, disable_tqdm, run_name); the bar starts at done_steps."""
        self.is_main = is_main
        self.file = self.writer = self.bar = None
        if not is_main:
            return
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        keep_records_up_to(output_dir / "metrics.jsonl", done_steps)
        self.file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        run_name = args.run_name or output_dir.name
        if args.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                msg = "report_to = 'tensorboard' needs TensorBoard: pip install 'minirlhf[tensorboard]'"
                raise ImportError(msg) from None
            self.writer = SummaryWriter(str(output_dir / "runs" / run_name))
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=done_steps, disable=args.disable_tqdm, dynamic_ncols=True,
                        desc=run_name)
        self.tqdm_write = tqdm.write

    def update(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        self.tqdm_write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, metrics.get("step", 0))

    def close(self) -> None:
        for handle in (self.bar, self.file, self.writer):
            if handle is not None:
                handle.close()
