"""What bench_reward.py and bench_ppo.py share: child processes with their peak RSS, the matmul peak, the useful
model FLOP count, the machine line, neighbouring-run ratios and markdown tables.

Useful model FLOPs (the same count for every side, from the non-pad tokens only). One forward pass over a sequence of
S real tokens through a decoder with N non-embedding parameters in its trunk (layers and final norm), L layers and
hidden size d costs

    2 * N * S  +  2 * L * d * S * (S + 1)

the matmuls against the weights (one multiply-add per weight and token), and causal attention: query i scores i keys
and mixes i values (4 * d * i FLOPs per layer), summed over i = 1..S. A backward pass costs twice the forward.
Projections onto a vocabulary (lm_head) are counted only where a token is predicted that the loss or the sampler uses,
2 * vocab * d per such position. Padding, tokens after a response's stop token and logits nobody reads are not useful
work. Every side's FLOP/s divides this same count by its own time, so the fraction of the matmul peak compares like
for like; a side that skips work (padding-free packing, a shared prompt computed once) can exceed what the padded
sides would need, never the count.
"""

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def csv(kind=str):
    """argparse type: a comma-separated list, e.g. `--threads 1,2`."""
    return lambda text: [kind(item) for item in text.split(",") if item]


def forward_flops(seq_lens, n_params: int, n_layers: int, hidden: int) -> float:
    """FLOPs of one forward pass over sequences of these real lengths (module docstring); x3 with backward."""
    return sum(2 * n_params * s + 2 * n_layers * hidden * s * (s + 1) for s in seq_lens)


def matmul_peak(threads: int, dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """Dense (n, n) @ (n, n) FLOP/s at `threads` threads in this process: the median of `repeats` after 3 warmups."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = []
    for i in range(3 + repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if i >= 3:
            seconds.append(time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * n**3 / statistics.median(seconds)


def run_child(cmd: list[str], threads: int, log_path: Path, env: dict | None = None) -> dict:
    """Run one benchmark child (`threads` torch and OpenMP threads); returns the JSON of its last stdout line with
    peak_rss_mib added: ru_maxrss of the child (os.wait4), covering imports, loading and training."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, *cmd, "--threads", str(threads)], stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"{shlex.join(cmd)} failed ({os.waitstatus_to_exitcode(status)}):\n{log.read()[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def rss_mib(key: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS), or its peak (VmHWM) since start or the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def reset_peak_rss() -> float:
    """Reset this process's peak resident memory (VmHWM) to its resident memory now, through /proc/self/clear_refs;
    returns that memory. `rss_mib("VmHWM")` minus it, later, is the growth of resident memory in between."""
    before = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")
    return before


# the flags that decide bf16 and matmul speed on x86: AVX2 and AVX-512 FMA, native bf16 dot products, AMX tiles
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags() -> str:
    """Which of CPU_FLAGS /proc/cpuinfo lists, e.g. "avx2 avx512f avx512_bf16, no amx_tile amx_bf16"; "" off Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return ""
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split())
    present, absent = [f for f in CPU_FLAGS if f in flags], [f for f in CPU_FLAGS if f not in flags]
    return " ".join(present) + (", no " + " ".join(absent) if absent else "")


def machine_line() -> str:
    """Date, library versions, CPU, its bf16/matmul flags and load: the line under the command atop a report."""
    import transformers
    import trl

    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | transformers "
            f"{transformers.__version__} | trl {trl.__version__} | {cpu.group(1) if cpu else 'cpu'}, "
            f"{os.cpu_count()} cores{' | ' + cpu_flags() if cpu_flags() else ''} | load average (1/5/15 min) {load}")


def ratio(ours: list[float], theirs: list[float]) -> str:
    """The median of ours / theirs over neighbouring runs (run i of each side), with the range when > 1 run."""
    pairs = [a / b for a, b in zip(ours, theirs, strict=True)]
    text = f"{statistics.median(pairs):.2f}x"
    return text + (f" ({min(pairs):.2f}-{max(pairs):.2f})" if len(pairs) > 1 else "")


def table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A markdown table; the first `left` columns left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * left + "---:|" * (len(header) - left)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
