"""Reward-training benchmark: minirlhf.reward vs TRL 1.12's RewardTrainer on the same model, data and settings.

Both sides train the same model folder (a ~12M-parameter Llama with random weights, built with transformers and
saved once) on the same preference file (random words, 60-128 tokens per side) for the same steps: batch 8 pairs,
max_length 128, fp32, CPU, logging every `warmup` steps, no evaluation or saving. The two runs follow the same
trajectory (tests/test_reward.py checks that), so they process the same tokens; the benchmark asserts it.

Each run is its own subprocess, and the runs alternate (ours, trl, ours, trl, ...) so that a busy neighbour on a
shared machine slows both sides alike. Measured in each run:
- steady-state speed: the wall time of the `steps` optimizer steps after `warmup` steps, from the end of step
  `warmup` to the end of the last step. Loading, tokenization and the first steps are excluded. Step ends are taken
  from a TrainerCallback (on_step_end) on TRL's side and by wrapping MetricsLogger.update on ours; both fire right
  after the optimizer step, before logging. Train tokens are the non-pad tokens (attention_mask.sum(), both sides'
  logged `num_tokens`) of those steps;
- peak RSS: ru_maxrss of the child (os.wait4), so it covers imports, loading and training; "train growth" is peak
  RSS minus the RSS when training starts (after the model, data and optimizer are set up).
Reported: medians over the repeats, and ratios ours / TRL (speed: > 1 means we are faster; memory: < 1 means we
use less). The speed ratio is the median of the ratios of neighbouring runs, with their range in brackets.
Targets from the issue: >= 1.5x TRL's tokens/s, <= TRL's peak memory.

On a machine shared with other busy processes, torch's default threads (one per core) spend much of each kernel
waiting for a thread that has lost its core; `--threads 1` then measures the code rather than the scheduler.

Usage (wall times on the 2-core development machine, which runs other jobs):
    python benchmarks/bench_reward.py               # checkpointing off and on, 3 repeats: ~6 min at load average
                                                    # 1.5, ~50 min at load average 6
    python benchmarks/bench_reward.py --threads 1   # ~11 min at load average 3.5
    python benchmarks/bench_reward.py --quick       # 1 repeat, 3 warmup + 9 timed steps: ~2.5 min
    python benchmarks/bench_reward.py --bf16        # bf16=true on both sides: CPU autocast in both trainers
"""

import argparse
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

MODEL = dict(hidden_size=384, num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=6,
             intermediate_size=1024, max_position_embeddings=256)
N_WORDS = 8000
SPECIAL = ["<|endoftext|>", "<pad>"]  # eos id 0, pad id 1
BATCH, MAX_LENGTH = 8, 128


# ---------------------------------------------------------------------------------------------------------------------
# The shared inputs: one model folder and one preference file, written once by the parent


def write_inputs(folder: Path, n_pairs: int) -> int:
    """Model + tokenizer folder (folder/model) and preference rows (folder/data/train.jsonl); returns #parameters."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    transformers.utils.logging.disable_progress_bar()
    words = [f"w{i}" for i in range(N_WORDS)]
    backend = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(SPECIAL + words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIAL[0],
                                                     pad_token=SPECIAL[1])
    tokenizer.save_pretrained(folder / "model")
    config = transformers.LlamaConfig(vocab_size=len(SPECIAL) + N_WORDS, eos_token_id=0, bos_token_id=0,
                                      pad_token_id=1, **MODEL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder / "model")
    n_params = model.num_parameters() - model.lm_head.weight.numel() + config.hidden_size  # lm_head -> 1-output score

    # One word is one token; each side is prompt + completion + EOS, 60-128 tokens, so max_length drops nothing.
    rng = random.Random(0)
    rows = []
    for _ in range(n_pairs):
        prompt_len = rng.randint(20, 59)
        row = {"prompt": " ".join(rng.choices(words, k=prompt_len))}
        for side in ("chosen", "rejected"):
            row[side] = " " + " ".join(rng.choices(words, k=rng.randint(60, MAX_LENGTH) - prompt_len - 1))
        rows.append(row)
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return n_params


def settings(gradient_checkpointing: bool, warmup: int, steps: int) -> dict:
    """The training settings both sides get (TRL names)."""
    return dict(per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, max_steps=warmup + steps,
                logging_steps=warmup, gradient_checkpointing=gradient_checkpointing, save_strategy="no",
                eval_strategy="no", learning_rate=1e-4, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# The child processes: one training run each, printing one JSON line


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def run_ours(folder: Path, cfg: dict, output_dir: Path, bf16: bool) -> dict:
    from minirlhf import common, reward

    step_ends, start_rss = [], []
    init, update = common.MetricsLogger.__init__, common.MetricsLogger.update

    def timed_init(self, *args, **kwargs):  # created right before the loop: the model, data and optimizer are set up
        start_rss.append(rss_kib())
        init(self, *args, **kwargs)

    def timed_update(self, steps: int = 1):  # called once per optimizer step (and with the resume step at start-up)
        if steps == 1:
            step_ends.append(time.perf_counter())
        update(self, steps)

    common.MetricsLogger.__init__, common.MetricsLogger.update = timed_init, timed_update
    reward.main([f"--model_name_or_path={folder / 'model'}", f"--dataset_name={folder / 'data'}",
                 f"--output_dir={output_dir}", "--disable_tqdm=true", "--report_to=none", "--dtype=float32",
                 f"--bf16={str(bf16).lower()}", *[f"--{k}={str(v).lower()}" for k, v in cfg.items()]])
    logs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_ends": step_ends, "start_rss_kib": start_rss[0], "logs": logs}


def run_trl(folder: Path, cfg: dict, output_dir: Path, bf16: bool) -> dict:
    import datasets
    import transformers
    from trl import RewardConfig, RewardTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    step_ends, start_rss = [], []

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            start_rss.append(rss_kib())

        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step, before logging
            step_ends.append(time.perf_counter())

    train = datasets.load_dataset("json", data_files={"train": str(folder / "data" / "train.jsonl")})["train"]
    # use_cpu: the Trainer then runs CPU autocast when bf16 is true (TRL's _BaseConfig)
    args = RewardConfig(output_dir=str(output_dir), bf16=bf16, use_cpu=True, report_to="none", disable_tqdm=True,
                        **cfg)
    trainer = RewardTrainer(model=str(folder / "model"), args=args, train_dataset=train, callbacks=[Timer()])
    trainer.train()
    return {"step_ends": step_ends, "start_rss_kib": start_rss[0], "logs": trainer.state.log_history}


def child(side: str, folder: Path, cfg: dict, warmup: int, bf16: bool) -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        result = (run_ours if side == "ours" else run_trl)(folder, cfg, Path(output_dir), bf16)
    # Logs come every `warmup` steps, so the cumulative num_tokens is known at step `warmup` and at the last step.
    tokens = {r["step"]: r["num_tokens"] for r in result["logs"] if "num_tokens" in r}
    ends, last = result["step_ends"], cfg["max_steps"]
    assert len(ends) == last, (len(ends), last)
    step_s = [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:], strict=True)]
    print(json.dumps({"seconds": ends[-1] - ends[warmup - 1], "median_step_s": statistics.median(step_s),
                      "tokens": tokens[last] - tokens[warmup], "steps": last - warmup,
                      "start_rss_mib": result["start_rss_kib"] / 1024, "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------------------------------------------------
# The parent: alternate the sides, collect medians, print the table


def run_child(side: str, folder: Path, gc: bool, warmup: int, steps: int, threads: int | None, bf16: bool) -> dict:
    """One training run in a fresh process; adds its peak RSS (ru_maxrss, KiB on Linux)."""
    cmd = [sys.executable, __file__, "--child", side, "--folder", str(folder), "--gc", str(gc).lower(),
           "--warmup", str(warmup), "--steps", str(steps)] + (["--bf16"] if bf16 else [])
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "hf_datasets_cache"), "TOKENIZERS_PARALLELISM": "false"}
    with open(folder / "child.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{side} run failed ({proc.returncode}):\n{log.read()[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def tok_s(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def summarize(runs: list[dict]) -> dict:
    return {"tok_s": statistics.median(tok_s(r) for r in runs),
            "steps_s": statistics.median(r["steps"] / r["seconds"] for r in runs),
            "step_ms": statistics.median(1000 * r["median_step_s"] for r in runs),
            "peak_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "growth_mib": statistics.median(r["peak_rss_mib"] - r["start_rss_mib"] for r in runs),
            "tokens_per_step": runs[0]["tokens"] / runs[0]["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 warmup + 9 timed steps")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side and setting (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run (default: "
                        "torch's default, the number of cores); 1 is steadier on a machine shared with other jobs")
    parser.add_argument("--bf16", action="store_true", help="bf16=true on both sides (CPU autocast), instead of fp32")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gc", choices=["true", "false"], help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.folder, settings(args.gc == "true", args.warmup, args.steps), args.warmup, args.bf16)
        return

    warmup, steps = (3, 9) if args.quick else (5, 25)  # steps: a multiple of warmup (logs land on both ends)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"$ python {shlex.join(sys.argv)}")
    import transformers
    import trl

    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_params = write_inputs(folder, n_pairs=BATCH * (warmup + steps))
        results = {}
        for gc in (False, True):
            runs = {"ours": [], "trl": []}
            for _ in range(repeats):
                for side in ("ours", "trl"):
                    r = run_child(side, folder, gc, warmup, steps, args.threads, args.bf16)
                    runs[side].append(r)
                    print(f"[bench_reward] gradient_checkpointing={str(gc).lower()} {side}: "
                          f"{tok_s(r):,.0f} tok/s, peak RSS {r['peak_rss_mib']:,.0f} MiB",
                          file=sys.stderr, flush=True)
            tokens = {(r["tokens"], r["steps"]) for rs in runs.values() for r in rs}
            assert len(tokens) == 1, f"the runs trained on different tokens: {tokens}"
            results[gc] = {side: summarize(r) for side, r in runs.items()}
            results[gc]["pair_ratios"] = [tok_s(o) / tok_s(t) for o, t in zip(runs["ours"], runs["trl"], strict=True)]
            threads = ",".join(sorted({str(r["threads"]) for rs in runs.values() for r in rs}))

    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | trl {trl.__version__} | {threads} torch threads | "
          f"{cpu.group(1) if cpu else 'cpu'} | load avg {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    first = results[False]["ours"]
    print(f"Llama {n_params / 1e6:.1f}M params ({', '.join(f'{k}={v}' for k, v in MODEL.items())}, vocab "
          f"{len(SPECIAL) + N_WORDS}), random weights; {BATCH} pairs/step, 60-128 tokens per side, max_length "
          f"{MAX_LENGTH}, ~{first['tokens_per_step']:.0f} non-pad tokens/step; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, CPU. {steps} timed steps after {warmup} warmup steps, median "
          f"of {repeats} run(s) per side, alternating ours/trl, one process each.\n")
    print("| gradient checkpointing | side | train tok/s | steps/s | median step ms | peak RSS MiB | train growth MiB "
          "| tok/s ours/TRL | peak RSS ours/TRL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for gc, sides in results.items():
        ours, theirs, pairs = sides["ours"], sides["trl"], sides["pair_ratios"]
        for side in ("ours", "trl"):
            r = sides[side]
            ratios = (f"{statistics.median(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f}) | "
                      f"{ours['peak_mib'] / theirs['peak_mib']:.2f}" if side == "ours" else " | ")
            print(f"| {str(gc).lower()} | {'minirlhf' if side == 'ours' else 'TRL'} | {r['tok_s']:,.0f} | "
                  f"{r['steps_s']:.2f} | {r['step_ms']:.0f} | {r['peak_mib']:,.0f} | {r['growth_mib']:,.0f} | "
                  f"{ratios} |")


if __name__ == "__main__":
    main()
