"""Reward-training benchmark: minirlhf.reward vs TRL 1.12's RewardTrainer on the same model, data and settings.

Both sides train the same model folder (a ~12M-parameter Llama with random weights, built with transformers and
saved once) on the same preference file for the same steps: batch 8 pairs, fp32 (or, with --bf16, bf16 autocast on
both sides), CPU, logging every `warmup` steps, no evaluation or saving. The two runs follow the same trajectory
(tests/test_reward.py checks that), so they process the same tokens; the benchmark asserts it. Two datasets of random
words (one word is one token):
- toy: prompt 20-59 tokens, each side (prompt + completion + EOS) 60-128 tokens, max_length 128; 4 warmup + 16 timed
  steps;
- spread: a realistic length spread, prompt 20-200 tokens, chosen and rejected completions 10-300 tokens each (drawn
  independently), max_length 512 (nothing is dropped); 2 warmup + 6 timed steps. Padding to the longest sequence
  of a batch wastes more here than on the toy set (~38% of a padded batch against ~24%), while prompts are ~42% of
  the tokens in both, so what padding-free packing buys depends on this shape, and what a shared prompt computed once
  buys on the prompt share: each table prints the padding of its timed steps and the prompt share of its file.
Sides: "minirlhf" (its defaults: padding_free and shared_prefix on, where this minirlhf has them), "minirlhf padded"
(padding_free=false, shared_prefix=false: right-padded batches, chosen and rejected computed whole, as TRL does) and
TRL. The padded side is skipped, with a note, when minirlhf's RewardConfig has no such keys.

Each run is its own subprocess, and the runs alternate (minirlhf, padded, TRL, minirlhf, ...) so that a busy
neighbour on a shared machine slows all sides alike. Every configuration runs at each of --threads (torch and
OpenMP threads of the child). Measured in each run:
- steady-state speed: the wall time of the `steps` optimizer steps after `warmup` steps, from the end of step
  `warmup` to the end of the last step. Loading, tokenization and the first steps are excluded. Step ends are taken
  from a TrainerCallback (on_step_end) on TRL's side and by wrapping MetricsLogger.update on ours; both fire right
  after the optimizer step, before logging. Train tokens are the non-pad tokens (attention_mask.sum(), both sides'
  logged `num_tokens`) of those steps;
- peak RSS: ru_maxrss of the child (os.wait4), so it covers imports, loading and training; "train growth" is peak
  RSS minus the RSS when training starts (after the model, data and optimizer are set up);
- model FLOP/s: useful FLOPs of the timed steps / their time, as a fraction of the dense matmul peak that the parent
  measures at the same thread count just before the runs (a 1024^3 matmul, fp32, or bf16 with --bf16; median of
  10). Useful FLOPs are 3 x the forward FLOPs of benchmarks/common.py over every chosen and rejected sequence's
  non-pad tokens: 6 * (N * S + L * d * S * (S + 1)) for a sequence of S tokens, N the non-embedding parameters
  (layers, final norm, score head), L layers, hidden size d. The lengths come from the batches TRL's compute_loss
  sees (the same batches on every side), so all sides share one count; a shared prompt counts twice.
Reported: medians over the repeats, and ratios to TRL (speed: > 1 means faster; memory: < 1 means less), each the
median over neighbouring runs (run i of each side) with their range in brackets.
Targets from the issue: >= 1.5x TRL's tokens/s, <= TRL's peak memory.

On a machine shared with other busy processes, two threads spend much of each kernel waiting for a thread that has
lost its core; one thread then measures the code rather than the scheduler.

Usage (2-core machine; wall times estimated from --quick runs on an idle machine, as the sides stood 2026-12-02):
    python benchmarks/bench_reward.py                      # toy and spread, 1 and 2 threads, 3 repeats: ~20 min
    python benchmarks/bench_reward.py --dataset spread --threads 1 --repeats 5
    python benchmarks/bench_reward.py --gc false,true      # gradient checkpointing off and on
    python benchmarks/bench_reward.py --bf16               # bf16=true on both sides: CPU autocast in both trainers
    python benchmarks/bench_reward.py --quick              # 1 repeat, 1 thread, a few steps, checks that it
                                                           # runs: ~2 min
"""

import argparse
import dataclasses
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import csv, forward_flops, machine_line, matmul_peak, ratio, rss_mib, run_child, table

MODEL = dict(hidden_size=384, num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=6,
             intermediate_size=1024, max_position_embeddings=512)
N_WORDS = 8000
SPECIAL = ["<|endoftext|>", "<pad>"]  # eos id 0, pad id 1
BATCH = 8
# (warmup, timed) steps; the timed steps are a multiple of warmup, so that logs land on both ends
DATASETS = {"toy": dict(max_length=128, steps=(4, 16), quick=(2, 4)),
            "spread": dict(max_length=512, steps=(2, 6), quick=(1, 2))}
SIDES = {"ours": "minirlhf", "ours-padded": "minirlhf padded", "trl": "TRL 1.12"}
PADDED = ["--padding_free=false", "--shared_prefix=false"]  # minirlhf's keys for the padded side


# ---------------------------------------------------------------------------------------------------------------------
# The shared inputs: one model folder and one preference file per dataset, written once by the parent


def preference_row(dataset: str, rng: random.Random, words: list[str]) -> dict:
    """One pair of random words; each side is prompt + completion + EOS (EOS appended by both trainers)."""
    if dataset == "toy":  # each side 60-128 tokens in all
        prompt_len = rng.randint(20, 59)
        sides = [rng.randint(60, 128) - prompt_len - 1 for _ in range(2)]
    else:  # spread: prompt 20-200, completions 10-300 tokens
        prompt_len, sides = rng.randint(20, 200), [rng.randint(10, 300) for _ in range(2)]
    row = {"prompt": " ".join(rng.choices(words, k=prompt_len))}
    for side, n in zip(("chosen", "rejected"), sides, strict=True):
        row[side] = " " + " ".join(rng.choices(words, k=n))
    return row


def write_inputs(folder: Path, n_pairs: dict[str, int]) -> dict:
    """Model + tokenizer folder (folder/model) and preference rows (folder/<dataset>/train.jsonl); returns the model's
    parameter counts and the datasets' prompt share (prompt tokens of both sides / all tokens)."""
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
    embedding, head = model.model.embed_tokens.weight.numel(), model.lm_head.weight.numel()
    info = {"params": model.num_parameters() - head + config.hidden_size,  # lm_head -> 1-output score
            "non_embedding": model.num_parameters() - embedding - head + config.hidden_size, "prompt_share": {}}

    rng = random.Random(0)
    for dataset, n in n_pairs.items():
        rows = [preference_row(dataset, rng, words) for _ in range(n)]
        (folder / dataset).mkdir()
        (folder / dataset / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        prompt = sum(2 * len(r["prompt"].split()) for r in rows)
        info["prompt_share"][dataset] = prompt / (prompt + sum(len(r[s].split()) + 1 for r in rows
                                                               for s in ("chosen", "rejected")))
    return info


def settings(dataset: str, gradient_checkpointing: bool, warmup: int, steps: int) -> dict:
    """The training settings both sides get (TRL names)."""
    return dict(per_device_train_batch_size=BATCH, max_length=DATASETS[dataset]["max_length"],
                max_steps=warmup + steps, logging_steps=warmup, gradient_checkpointing=gradient_checkpointing,
                save_strategy="no", eval_strategy="no", learning_rate=1e-4, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# The child processes: one training run each, printing one JSON line


def run_ours(data: Path, model: Path, cfg: dict, output_dir: Path, bf16: bool, extra: list[str]) -> dict:
    from minirlhf import reward
    from minirlhf.infra import metrics

    step_ends, start_rss = [], []
    init, update = metrics.MetricsLogger.__init__, metrics.MetricsLogger.update

    def timed_init(self, *args, **kwargs):  # created right before the loop: the model, data and optimizer are set up
        start_rss.append(rss_mib())
        init(self, *args, **kwargs)

    def timed_update(self):  # called once per optimizer step
        step_ends.append(time.perf_counter())
        update(self)

    metrics.MetricsLogger.__init__, metrics.MetricsLogger.update = timed_init, timed_update
    reward.main([f"--model_name_or_path={model}", f"--dataset_name={data}", f"--output_dir={output_dir}",
                 "--disable_tqdm=true", "--report_to=none", "--dtype=float32", f"--bf16={str(bf16).lower()}",
                 *[f"--{k}={str(v).lower()}" for k, v in cfg.items()], *extra])
    logs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_ends": step_ends, "start_rss_mib": start_rss[0], "logs": logs}


def run_trl(data: Path, model: Path, cfg: dict, output_dir: Path, bf16: bool) -> dict:
    import datasets
    import transformers
    from trl import RewardConfig, RewardTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    step_ends, start_rss, seq_lens = [], [], []

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            start_rss.append(rss_mib())

        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step, before logging
            step_ends.append(time.perf_counter())

    class Trainer(RewardTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):  # once per step: chosen rows, then rejected rows
            seq_lens.append(inputs["attention_mask"].sum(1).tolist())
            return super().compute_loss(model, inputs, *args, **kwargs)

    train = datasets.load_dataset("json", data_files={"train": str(data / "train.jsonl")})["train"]
    # use_cpu: the Trainer then runs CPU autocast when bf16 is true (TRL's _BaseConfig)
    args = RewardConfig(output_dir=str(output_dir), bf16=bf16, use_cpu=True, report_to="none", disable_tqdm=True,
                        **cfg)
    trainer = Trainer(model=str(model), args=args, train_dataset=train, callbacks=[Timer()])
    trainer.train()
    return {"step_ends": step_ends, "start_rss_mib": start_rss[0], "logs": trainer.state.log_history,
            "seq_lens": seq_lens}


def child(side: str, folder: Path, dataset: str, cfg: dict, warmup: int, bf16: bool) -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        if side == "trl":
            result = run_trl(folder / dataset, folder / "model", cfg, Path(output_dir), bf16)
        else:
            result = run_ours(folder / dataset, folder / "model", cfg, Path(output_dir), bf16,
                              PADDED if side == "ours-padded" else [])
    # Logs come every `warmup` steps, so the cumulative num_tokens is known at step `warmup` and at the last step.
    tokens = {r["step"]: r["num_tokens"] for r in result["logs"] if "num_tokens" in r}
    ends, last = result["step_ends"], cfg["max_steps"]
    assert len(ends) == last, (len(ends), last)
    step_s = [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:], strict=True)]
    print(json.dumps({"seconds": ends[-1] - ends[warmup - 1], "median_step_s": statistics.median(step_s),
                      "tokens": tokens[last] - tokens[warmup], "steps": last - warmup,
                      "start_rss_mib": result["start_rss_mib"], "threads": torch.get_num_threads(),
                      "seq_lens": result.get("seq_lens", [])[warmup:]}))


# ---------------------------------------------------------------------------------------------------------------------
# The parent: alternate the sides, collect medians, print one table per (dataset, threads)


def tok_s(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def report(dataset: str, threads: int, peak: float, load: tuple[float, float], by_gc: dict, info: dict,
           bf16: bool) -> str:
    """The markdown table of one (dataset, threads) group: a row per gradient-checkpointing setting and side."""
    trl_runs = next(iter(by_gc.values()))["trl"]
    seq_lens = [s for step in trl_runs[0]["seq_lens"] for s in step]  # the timed steps' sequences, all sides
    flops = 3 * forward_flops(seq_lens, info["non_embedding"], MODEL["num_hidden_layers"], MODEL["hidden_size"])
    padded = sum(2 * BATCH * max(step) for step in trl_runs[0]["seq_lens"])  # TRL pads chosen + rejected together
    rows = []
    for gc, runs in by_gc.items():
        for side, rs in runs.items():
            gflop_s = statistics.median(flops / r["seconds"] for r in rs) / 1e9
            versus = (["", ""] if side == "trl" else
                      [ratio([tok_s(r) for r in rs], [tok_s(r) for r in runs["trl"]]),
                       ratio([r["peak_rss_mib"] for r in rs], [r["peak_rss_mib"] for r in runs["trl"]])])
            rows.append([str(gc).lower(), SIDES[side], f"{statistics.median(tok_s(r) for r in rs):,.0f}",
                         f"{statistics.median(r['steps'] / r['seconds'] for r in rs):.2f}",
                         f"{statistics.median(1000 * r['median_step_s'] for r in rs):.0f}",
                         f"{statistics.median(r['peak_rss_mib'] for r in rs):,.0f}",
                         f"{statistics.median(r['peak_rss_mib'] - r['start_rss_mib'] for r in rs):,.0f}",
                         f"{gflop_s:.1f}", f"{100 * gflop_s * 1e9 / peak:.0f}%", *versus])
    run = trl_runs[0]
    title = (f"**{dataset}, {threads} thread{'s' if threads > 1 else ''}**: {run['tokens'] / run['steps']:,.0f} "
             f"non-pad tokens/step, {100 * (1 - sum(seq_lens) / padded):.0f}% of a padded batch is padding, prompts "
             f"{100 * info['prompt_share'][dataset]:.0f}% of the tokens; {'bf16' if bf16 else 'fp32'} matmul peak "
             f"{peak / 1e9:.0f} GFLOP/s; {flops / run['steps'] / 1e9:.1f} useful GFLOP/step; load average "
             f"{load[0]:.1f} before, {load[1]:.1f} after\n\n")
    shared = "ours" in next(iter(by_gc.values()))
    note = ("\n\nminirlhf's shared_prefix computes each pair's prompt once, where the count has it twice: its "
            "FLOP/s include work it skipped and can exceed 100% of the peak." if shared else "")
    return title + table(["gradient checkpointing", "side", "train tok/s", "steps/s", "median step ms",
                          "peak RSS MiB", "train growth MiB", "model GFLOP/s", "of peak", "tok/s vs TRL",
                          "peak RSS vs TRL"], rows, left=2) + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, a few steps, 1 thread (unless --threads): checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side and setting (default 3; quick 1)")
    parser.add_argument("--threads", type=csv(int), default=None,
                        help="thread counts, each run at every one (default 1,2; quick 1)")
    parser.add_argument("--dataset", type=csv(), default=list(DATASETS), help="toy, spread or both (default)")
    parser.add_argument("--gc", type=csv(lambda s: {"true": True, "false": False}[s]), default=[False],
                        help="gradient checkpointing settings, e.g. false,true (default false)")
    parser.add_argument("--sides", type=csv(), default=list(SIDES), help=f"of {', '.join(SIDES)} (default all)")
    parser.add_argument("--bf16", action="store_true", help="bf16=true on both sides (CPU autocast), instead of fp32")
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads[0])
        child(args.child, args.folder, args.dataset[0], settings(args.dataset[0], args.gc[0], args.warmup, args.steps),
              args.warmup, args.bf16)
        return

    threads = args.threads or ([1] if args.quick else [1, 2])
    repeats = args.repeats or (1 if args.quick else 3)
    unknown = set(args.dataset) - set(DATASETS) | set(args.sides) - set(SIDES)
    if unknown or "trl" not in args.sides:
        parser.error(f"unknown names {sorted(unknown)}" if unknown else "--sides needs trl (the baseline)")
    from minirlhf.reward import RewardConfig

    sides = [s for s in SIDES if s in args.sides]
    if "ours-padded" in sides and not {"padding_free", "shared_prefix"} <= {f.name for f in
                                                                            dataclasses.fields(RewardConfig)}:
        sides.remove("ours-padded")
        print("note: this minirlhf's RewardConfig has no padding_free/shared_prefix keys: no 'minirlhf padded' runs",
              file=sys.stderr)
    print(f"$ python {shlex.join(sys.argv)}\n{machine_line()}\n")
    steps = {d: DATASETS[d]["quick" if args.quick else "steps"] for d in args.dataset}
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        info = write_inputs(folder, {d: BATCH * sum(steps[d]) for d in args.dataset})
        print(f"Llama {info['params'] / 1e6:.1f}M parameters ({info['non_embedding'] / 1e6:.1f}M non-embedding; "
              f"{', '.join(f'{k}={v}' for k, v in MODEL.items())}, vocab {len(SPECIAL) + N_WORDS}), random weights; "
              f"{BATCH} pairs/step, lr 1e-4, {'bf16 autocast' if args.bf16 else 'fp32'}, CPU. Timed steps after "
              f"warmup steps: {', '.join(f'{d} {t} after {w}' for d, (w, t) in steps.items())}; median of {repeats} "
              f"run(s) per side, alternating {' / '.join(SIDES[s] for s in sides)}, one process each.\n", flush=True)
        for dataset in args.dataset:
            warmup, timed = steps[dataset]
            for n_threads in threads:
                load_before, peak = os.getloadavg()[0], matmul_peak(n_threads, dtype)
                by_gc = {}
                for gc in args.gc:
                    runs = by_gc[gc] = {side: [] for side in sides}
                    for _ in range(repeats):
                        for side in sides:
                            cmd = [__file__, "--child", side, "--folder", str(folder), "--dataset", dataset,
                                   "--gc", str(gc).lower(), "--warmup", str(warmup), "--steps", str(timed),
                                   *(["--bf16"] if args.bf16 else [])]
                            r = run_child(cmd, n_threads, folder / "child.log",
                                          {"HF_DATASETS_CACHE": str(folder / "hf_datasets_cache")})
                            runs[side].append(r)
                            print(f"[bench_reward] {dataset}, {n_threads} thread(s), gradient_checkpointing="
                                  f"{str(gc).lower()}, {SIDES[side]}: {tok_s(r):,.0f} tok/s, peak RSS "
                                  f"{r['peak_rss_mib']:,.0f} MiB", file=sys.stderr, flush=True)
                    tokens = {(r["tokens"], r["steps"]) for rs in runs.values() for r in rs}
                    assert len(tokens) == 1, f"the runs trained on different tokens: {tokens}"
                print(report(dataset, n_threads, peak, (load_before, os.getloadavg()[0]), by_gc, info, args.bf16)
                      + "\n", flush=True)


if __name__ == "__main__":
    main()
