"""PPO benchmark: minirlhf.ppo vs TRL 1.12's PPOTrainer on CPU, the same ~12M-parameter Llama models.

Both sides load the same random policy and reward/value model (saved once by transformers, no downloads) and run
the same PPO updates: batch 8 prompts of 16-24 tokens, 24 sampled tokens each (no stop token, so both sample exactly
8 * 24 tokens per update), 4 PPO epochs of one minibatch, no gradient clipping or checkpointing (TRL applies
neither). minirlhf runs twice, with bf16=false (fp32) and with bf16=true (CPU bf16 autocast); TRL runs with
bf16=true (and use_cpu=true, which TRL needs for bf16 on CPU), which its PPOTrainer does not apply (its accelerator
has no mixed precision): the child prints TRL's accelerator.mixed_precision, "no", so its row is fp32 compute
whatever bf16 says. A fourth run is minirlhf's fp32 loop with LoRA on the policy (TRL ModelConfig's defaults: r 16,
alpha 32 on q_proj and v_proj; the reference is the policy with its adapters off, so no reference copy is loaded).

Each run is a fresh subprocess, so that peak RSS (ru_maxrss: imports, four models, optimizer state and the largest
temporaries) is its own; the sides alternate over the repeats, so a busy neighbour on a shared machine slows all
alike. Reported per side (median over repeats): episodes/s over the updates after the first (warmup), generation
tokens/s (sampling time only; TRL's `batch_generation` is timed through a wrapper), and peak RSS. Ratios are ours /
TRL's (> 1: ours is faster or, for memory, larger), and LoRA's / the full fp32 run's.

Usage:
    python benchmarks/bench_ppo.py --threads 1 --repeats 3   # ~3 minutes on 2 idle cores
    python benchmarks/bench_ppo.py                           # torch's default threads; on a busy machine OpenMP
                                                             # threads oversubscribe the cores (measured: > 15 min)
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

BATCH, RESPONSE_LENGTH, PPO_EPOCHS, UPDATES = 8, 24, 4, 6
MODEL = dict(vocab_size=16384, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=688, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None)
EOS = 2


def build(folder: Path) -> None:
    """Random Llama policy and seq-cls reward model, a word-level tokenizer with an added [PAD], and prompts."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL)
    transformers.LlamaForCausalLM(config).save_pretrained(folder / "policy")
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**MODEL, num_labels=1)).save_pretrained(
        folder / "reward")
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": EOS, **{f"t{i}": i for i in range(3, MODEL["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                                     padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(folder / "policy")
    lengths = torch.randint(16, 25, (BATCH * UPDATES,)).tolist()
    prompts = [torch.randint(3, MODEL["vocab_size"], (n,)).tolist() for n in lengths]
    (folder / "prompts.json").write_text(json.dumps(prompts))


def run_ours(folder: Path, precision: torch.dtype | None, lora: bool = False) -> tuple[list[float], float, int]:
    """Update wall times, sampling seconds and sampled tokens of minirlhf's loop (ppo.main's steps 1-2)."""
    from minirlhf import ppo, rollout
    from minirlhf.data import prompt_batches
    from minirlhf.hf import load_pretrained
    from minirlhf.lora import LORA_DEFAULT, adapters_disabled, add_lora
    from minirlhf.model import CausalLM, PolicyAndValue, RewardModel
    from minirlhf.optim import AdamW, param_groups
    from minirlhf.tokenizer import Tokenizer

    prompts = [{"input_ids": p} for p in json.loads((folder / "prompts.json").read_text())]
    args = ppo.PPOConfig(per_device_train_batch_size=BATCH, local_rollout_forward_batch_size=BATCH,
                         response_length=RESPONSE_LENGTH, num_ppo_epochs=PPO_EPOCHS, total_episodes=len(prompts),
                         learning_rate=1e-5, max_grad_norm=0, gradient_checkpointing=False)
    args.set_runtime_sizes(1, len(prompts))
    pad = Tokenizer.from_pretrained(folder / "policy").pad_token_id
    policy = load_pretrained(CausalLM, str(folder / "policy"))
    ref_policy = None if lora else load_pretrained(CausalLM, str(folder / "policy"))
    if lora:  # PPO's dropout is off, so the adapters' too
        add_lora(policy, r=16, alpha=32, dropout=0.0, target_modules=LORA_DEFAULT)
    value_model, reward_model = (load_pretrained(RewardModel, str(folder / "reward")) for _ in range(2))
    model = PolicyAndValue(policy, value_model).train()
    optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
    batches = prompt_batches(prompts, args.local_batch_size, pad, args.seed, 0, 1)
    times, sampling, tokens = [], 0.0, 0
    for update in range(1, args.num_total_batches + 1):
        start = time.perf_counter()
        queries = next(batches)
        query_responses, logprobs = rollout.sample_responses(policy, queries, args, pad, None, precision)
        sampling += time.perf_counter() - start if update > 1 else 0.0
        tokens += query_responses[:, queries.shape[1]:].numel() if update > 1 else 0
        with adapters_disabled(policy):  # LoRA: the reference is the policy without its adapters (else: no-op)
            rollouts = rollout.score_responses(ref_policy or policy, value_model, reward_model, queries,
                                               query_responses, logprobs, args, pad, None, precision)
        batch = ppo.compute_advantages(rollouts, args, EOS)
        ppo.ppo_update(model, optimizer, batch, args, pad, ppo.minibatch_orders(args, update), precision)
        times.append(time.perf_counter() - start)
    return times[1:], sampling, tokens


def run_trl(folder: Path, output_dir: str) -> tuple[list[float], float, int, str]:
    """The same for TRL, and its accelerator's mixed precision: update boundaries and sampling time from a wrapper
    around its batch_generation."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import transformers
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    prompts = json.loads((folder / "prompts.json").read_text())
    calls = []  # (start, end, sampled tokens) of each update's generation
    original = ppo_trainer.batch_generation

    def timed_batch_generation(model, queries, *args, **kwargs):
        start = time.perf_counter()
        query_responses, logits = original(model, queries, *args, **kwargs)
        calls.append((start, time.perf_counter(), query_responses[:, queries.shape[1]:].numel()))
        return query_responses, logits

    ppo_trainer.batch_generation = timed_batch_generation
    args = PPOConfig(output_dir=output_dir, per_device_train_batch_size=BATCH, local_rollout_forward_batch_size=BATCH,
                     response_length=RESPONSE_LENGTH, num_ppo_epochs=PPO_EPOCHS, total_episodes=len(prompts),
                     learning_rate=1e-5, num_sample_generations=0, bf16=True, use_cpu=True, report_to="none",
                     save_strategy="no", disable_tqdm=True)
    dataset = datasets.Dataset.from_dict({"input_ids": prompts})
    trainer = PPOTrainer(
        args=args, processing_class=transformers.AutoTokenizer.from_pretrained(folder / "policy"),
        model=transformers.AutoModelForCausalLM.from_pretrained(folder / "policy"), ref_model=None,
        reward_model=transformers.AutoModelForSequenceClassification.from_pretrained(folder / "reward"),
        value_model=transformers.AutoModelForSequenceClassification.from_pretrained(folder / "reward"),
        train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    ends = [start for start, _, _ in calls[1:]] + [time.perf_counter()]
    times = [end - start for (start, _, _), end in zip(calls, ends, strict=True)]
    sampling = sum(end - start for start, end, _ in calls[1:])
    return times[1:], sampling, sum(n for _, _, n in calls[1:]), trainer.accelerator.mixed_precision


def child(side: str, folder: Path) -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        if side == "trl":
            times, sampling, tokens, autocast = run_trl(folder, output_dir)
        else:
            precision = torch.bfloat16 if side == "ours-bf16" else None
            times, sampling, tokens = run_ours(folder, precision, lora=side == "ours-lora")
            autocast = "bf16" if precision else "no"
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"episodes_s": BATCH * len(times) / sum(times), "gen_tok_s": tokens / sampling,
                      "update_s": statistics.median(times), "peak_rss_mib": peak_mib, "autocast": autocast}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return

    print(f"$ python {shlex.join(sys.argv)}")
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | {args.threads} threads | "
          f"batch {BATCH}, response_length {RESPONSE_LENGTH}, {PPO_EPOCHS} PPO epochs, {UPDATES} updates (1 warmup)")
    sides = {"ours-fp32": "minirlhf, bf16=false", "ours-bf16": "minirlhf, bf16=true", "trl": "TRL 1.12, bf16=true",
             "ours-lora": "minirlhf LoRA r=16, bf16=false"}
    results = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for _ in range(args.repeats):
            for side in results:
                out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", side, tmp],
                                     capture_output=True, text=True, env=env, check=True)
                results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    params = sum(v for v in (MODEL["vocab_size"] * MODEL["hidden_size"] * 2,
                             MODEL["num_hidden_layers"] * (4 * MODEL["hidden_size"] ** 2
                                                           + 3 * MODEL["hidden_size"] * MODEL["intermediate_size"])))
    print(f"policy ~{params / 1e6:.1f}M parameters (Llama, vocab {MODEL['vocab_size']}), fp32 weights, CPU; median of "
          f"{args.repeats} runs per side; 'autocast' is what each run applied\n")
    keys = [("episodes_s", "episodes/s", "{:.2f}"), ("gen_tok_s", "generation tok/s", "{:,.0f}"),
            ("update_s", "s/update", "{:.2f}"), ("peak_rss_mib", "peak RSS MiB", "{:,.0f}")]
    medians = {side: {k: statistics.median(r[k] for r in runs) for k, _, _ in keys} for side, runs in results.items()}
    print("| | autocast | " + " | ".join(name for _, name, _ in keys) + " |")
    print("|---|---|" + "---:|" * len(keys))
    for side, label in sides.items():
        autocast = "/".join(sorted({r["autocast"] for r in results[side]}))
        print(f"| {label} | {autocast} | " + " | ".join(fmt.format(medians[side][k]) for k, _, fmt in keys) + " |")
    for side in ("ours-fp32", "ours-bf16"):
        ratios = " | ".join(f"{medians[side][k] / medians['trl'][k]:.2f}x" for k, _, _ in keys)
        print(f"| {sides[side].removeprefix('minirlhf, ')} / TRL | | {ratios} |")
    ratios = " | ".join(f"{medians['ours-lora'][k] / medians['ours-fp32'][k]:.2f}x" for k, _, _ in keys)
    print(f"| LoRA / full, bf16=false | | {ratios} |")

if __name__ == "__main__":
    main()
