"""Model benchmark: our CausalLM vs transformers (eager and sdpa attention) on CPU, fp32.

Measures, for a tiny Llama and ~52M-parameter Llama and GPT-NeoX configs (random weights, no downloads):
- forward+backward tokens/s: logits -> next-token cross-entropy -> backward, the same code around both models;
- peak step memory: in a fresh subprocess per (model, implementation), the growth of resident memory during the
  first forward+backward. The peak-RSS counter is reset (/proc/self/clear_refs) after the model and batch are built,
  so the number is peak RSS - RSS before the step: activations, gradients and temporaries. A fresh process matters:
  once the allocator has grown, later steps reuse freed memory and their RSS growth says nothing. tracemalloc does
  not see torch's allocations, and ru_maxrss would include building the model;
- greedy generation tokens/s: our `generate` vs transformers' `generate` (use_cache=True), the same left-padded
  prompts, max_new_tokens and weights, no stop token, so both produce B * max_new_tokens tokens.
Timings are the median of several repeats after warmup. The implementations run interleaved (ours, eager, sdpa,
ours, ...) in one process, so that a busy neighbour on a shared machine slows all of them alike. Speedups are
theirs / ours (> 1: ours is faster), by wall clock and by the process's CPU time: on a shared machine the wall clock
also measures the scheduler, while with one thread CPU time counts only our work (with two, OpenMP threads spin
while waiting for a descheduled peer, so CPU time is inflated too; use --threads 1 when the machine is busy).

Usage:
    python benchmarks/bench_model.py           # all three models, ~4 minutes on 2 cores
    python benchmarks/bench_model.py --quick   # the tiny model only, fewer repeats, ~30 s
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
import transformers

from minirlhf import CausalLM
from minirlhf.generate import generate
from minirlhf.infra.hf import config_from_hf, init_weights, load_pretrained

MODELS = {  # name -> (model_type, transformers config fields)
    "tiny-llama": ("llama", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128)),
    "llama-52M": ("llama", dict(vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                num_key_value_heads=8, intermediate_size=1376)),
    "neox-52M": ("gpt_neox", dict(vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                  intermediate_size=2048, rotary_pct=0.25)),
}
IMPLS = ["ours", "hf-eager", "hf-sdpa"]
TRAIN_BATCH, TRAIN_SEQ = 4, 256
GEN_BATCH, GEN_PROMPT, GEN_NEW_TOKENS = 8, 32, 64
PAD = 0


def hf_config(name: str) -> transformers.PretrainedConfig:
    model_type, fields = MODELS[name]
    return transformers.AutoConfig.for_model(model_type, max_position_embeddings=1024, bos_token_id=1,
                                             eos_token_id=None, pad_token_id=PAD, **fields)


def build_fresh(name: str, impl: str):
    """One randomly initialised model (for the memory subprocess, where the weights do not matter)."""
    if impl == "ours":
        model = CausalLM(config_from_hf(hf_config(name).to_dict()))
        init_weights(model, model.cfg)
        return model
    return transformers.AutoModelForCausalLM.from_config(hf_config(name), attn_implementation=impl[3:])


def build_all(name: str) -> dict:
    """The three implementations with the same weights: transformers' eager model, a copy with sdpa, and ours
    loaded from its save_pretrained folder."""
    torch.manual_seed(0)
    eager = build_fresh(name, "hf-eager")
    sdpa = build_fresh(name, "hf-sdpa")
    sdpa.load_state_dict(eager.state_dict())
    for model in (eager, sdpa):
        model.generation_config.eos_token_id = None  # no early stop: both sides generate every token
    with tempfile.TemporaryDirectory() as folder:
        eager.save_pretrained(folder)
        ours = load_pretrained(CausalLM, folder)
    return {"ours": ours, "hf-eager": eager, "hf-sdpa": sdpa}


def train_step(model, input_ids: torch.Tensor) -> None:
    logits = model(input_ids) if isinstance(model, CausalLM) else model(input_ids=input_ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def greedy(model, queries: torch.Tensor) -> torch.Tensor:
    if isinstance(model, CausalLM):
        return generate(model, queries, PAD, GEN_NEW_TOKENS, temperature=1e-10).query_responses  # greedy
    mask = queries != PAD
    return model.generate(input_ids=queries, attention_mask=mask, max_new_tokens=GEN_NEW_TOKENS, do_sample=False,
                          use_cache=True, pad_token_id=PAD)


def interleaved_medians(fns: dict, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each function, called in turn so that load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {key: tuple(statistics.median(x) for x in zip(*t, strict=True)) for key, t in times.items()}


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def memory_child(name: str, impl: str) -> None:
    """Runs in the subprocess: print the resident-memory growth (MiB) of the first forward+backward."""
    torch.manual_seed(0)
    model = build_fresh(name, impl).train()
    input_ids = torch.randint(1, MODELS[name][1]["vocab_size"], (TRAIN_BATCH, TRAIN_SEQ))
    before = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    train_step(model, input_ids)
    print(json.dumps({"step_mib": (proc_status_kib("VmHWM") - before) / 1024}))


def step_memory_mib(name: str, impl: str, threads: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", name, impl, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["step_mib"]


def left_padded_prompts(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    queries = torch.randint(1, vocab_size, (GEN_BATCH, GEN_PROMPT), generator=g)
    lengths = torch.linspace(GEN_PROMPT // 2, GEN_PROMPT, GEN_BATCH).long()  # (B,)
    return queries.masked_fill(torch.arange(GEN_PROMPT)[None] < GEN_PROMPT - lengths[:, None], PAD)


def bench(name: str, warmup: int, repeats: int, threads: int) -> list[dict]:
    models = build_all(name)
    n_params = sum(p.numel() for p in models["ours"].parameters())
    vocab_size = MODELS[name][1]["vocab_size"]

    input_ids = torch.randint(1, vocab_size, (TRAIN_BATCH, TRAIN_SEQ), generator=torch.Generator().manual_seed(0))
    for model in models.values():
        model.train()
    train_s = interleaved_medians({k: lambda m=m: train_step(m, input_ids) for k, m in models.items()},
                                  warmup, repeats)

    queries = left_padded_prompts(vocab_size)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        outputs = {k: greedy(m, queries) for k, m in models.items()}
        gen_s = interleaved_medians({k: lambda m=m: greedy(m, queries) for k, m in models.items()}, warmup, repeats)
    assert all(o.shape == (GEN_BATCH, GEN_PROMPT + GEN_NEW_TOKENS) for o in outputs.values())

    rows = []
    for impl in IMPLS:
        rows.append(dict(
            model=name, params_m=n_params / 1e6, impl=impl,
            train_tok_s=TRAIN_BATCH * TRAIN_SEQ / train_s[impl][0],
            train_ratio=train_s[impl][0] / train_s["ours"][0], train_cpu_ratio=train_s[impl][1] / train_s["ours"][1],
            step_mib=step_memory_mib(name, impl, threads),
            gen_tok_s=GEN_BATCH * GEN_NEW_TOKENS / gen_s[impl][0],
            gen_ratio=gen_s[impl][0] / gen_s["ours"][0], gen_cpu_ratio=gen_s[impl][1] / gen_s["ours"][1],
            same_tokens=bool(torch.equal(outputs[impl], outputs["ours"])),
        ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only, 3 repeats")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    names = ["tiny-llama"] if args.quick else list(MODELS)
    warmup, repeats = (1, 3) if args.quick else (1, 5)
    print(f"$ python {shlex.join(sys.argv)}")
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | {args.threads} threads | {cpu.group(1) if cpu else 'cpu'} | "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"fwd+bwd: batch {TRAIN_BATCH} x {TRAIN_SEQ} tokens, fp32; generation: batch {GEN_BATCH}, prompts "
          f"{GEN_PROMPT // 2}-{GEN_PROMPT} tokens left-padded, {GEN_NEW_TOKENS} new tokens, greedy; "
          f"median of {repeats} after {warmup} warmup; speedup = theirs / ours time, by wall clock and by this "
          f"process's CPU time\n")
    print("| model | impl | fwd+bwd tok/s | ours speedup (wall / CPU) | step memory MiB | generate tok/s "
          "| ours speedup (wall / CPU) | same tokens as ours |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name in names:
        for r in bench(name, warmup, repeats, args.threads):
            print(f"| {r['model']} ({r['params_m']:.1f}M) | {r['impl']} | {r['train_tok_s']:,.0f} | "
                  f"{r['train_ratio']:.2f}x / {r['train_cpu_ratio']:.2f}x | {r['step_mib']:,.0f} | "
                  f"{r['gen_tok_s']:,.0f} | {r['gen_ratio']:.2f}x / {r['gen_cpu_ratio']:.2f}x "
                  f"| {'yes' if r['same_tokens'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
