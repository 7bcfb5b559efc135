"""PPO benchmark: minirlhf.ppo vs TRL 1.12's PPOTrainer on CPU, the same random Llama models on both sides.

Both sides load the same random policy and reward/value model (saved once by transformers, no downloads; ~12M
parameters, 4 layers of 256, vocabulary 16,384, but for qwen-vocab) and run the same PPO updates: batch 8 prompts
(left-padded), 4 PPO epochs of one minibatch (qwen-vocab: 1), no gradient clipping or checkpointing (TRL applies
neither), temperature 0.7. Three datasets:
- toy: prompts of 16-24 tokens, 24 sampled tokens each (no stop token, so both sides sample exactly 8 * 24 tokens
  per update); 6 updates, the first a warmup;
- spread: a realistic length spread, prompts of 20-200 tokens and responses that end at EOS (stop_token "eos" on both
  sides) after 1-128 tokens, mean ~40; 3 updates, the first a warmup. Padding (a batch is as wide as its longest
  prompt plus its longest response) is a large share of a padded forward here and a small one on the toy set, so
  what padding-free packing buys depends on this shape.
  A random-weight policy almost never samples EOS (1 in 16k), so the spread policy is edited to emit it at a set
  rate: every token embedding gets 1.0 in hidden dimension 0, far above the other entries (std 0.02), so the final
  norm's output has a large, nearly constant component there (3.4 +- 0.1 here, whatever the context); lm_head's
  column 0 is zeroed but for EOS's row, which gets the weight that puts EOS's tempered logit log(p / (1 - p)) above
  the logsumexp of the others, calibrated on random contexts at build time. With p = 3 / response_length
  responses are geometric: mean ~ response_length / 3, ~5% run to response_length without EOS;
- qwen-vocab, a memory case: a small trunk (2 layers of 64, 4 heads, MLP 256; 0.1M parameters) under Qwen2's
  151,936-token vocabulary (19.6M parameters in the policy, nearly all embedding and lm_head), toy's prompts of 16-24
  tokens and 256 sampled tokens each (no stop token); 2 updates, the first a warmup, of 1 PPO epoch (every epoch
  repeats the first one's allocations, so more epochs only add time: 3.5-4.5 min a run at 4). A (B, T, V) fp32 copy
  of the logits is 8 * 280 * 151,936 * 4 bytes = 1.3 GiB here; what counts is how many a side holds at once: TRL's
  peak RSS is ~8.3 GiB. Its default is 1 thread and 1 repeat, to keep the default run short.
Both sides get the same prompts in the same order (the file's: TRL's dataloader is replaced by an unshuffled one,
ours reads the file's batches) and seed torch's global generator with the same number before each update's
sampling. Both samplers then draw the same tokens (transformers' and minirlhf's torch.multinomial over the same
probabilities), so the sides process the same episodes, up to a rare flip where their weights differ in the last
bits after an update: the table shows how many of each side's episodes have TRL's lengths. Tokens are still counted
from each side's own episodes (mean prompt + response per side), and response tokens/s and model FLOP/s (useful work
per second) stand next to episodes/s.

Sides: "minirlhf" (fp32, its defaults: padding_free where this minirlhf has it), "minirlhf padded"
(padding_free=false; skipped, with a note, when PPOConfig has no such key) and TRL with bf16=true (and
use_cpu=true, which TRL needs for bf16 on CPU), which its PPOTrainer does not apply (its accelerator has no mixed
precision): the child reports TRL's accelerator.mixed_precision, "no", so TRL computes in fp32 whatever bf16 says.
Optional sides: "minirlhf, bf16=true" (CPU bf16 autocast; side ours-bf16) and minirlhf's fp32 loop with LoRA on the
policy (ours-lora: TRL ModelConfig's defaults, r 16, alpha 32 on q_proj and v_proj; the reference is the policy with
its adapters off, so no reference copy is loaded).

Each run is a fresh subprocess, so that peak RSS (ru_maxrss: imports, four models, optimizer state and the largest
temporaries) is its own; the sides alternate over the repeats, so a busy neighbour on a shared machine slows all
alike. Every configuration runs at each of --threads. Reported per side, the median over repeats of: episodes/s and
response tokens/s (tokens up to and including each stop) over the updates after the first; generation tokens/s
(sampling time only; TRL's `batch_generation` is timed through a wrapper); seconds per update; peak RSS; the
update's RSS growth (the largest over the timed updates of resident memory's peak during an update minus resident
memory at its start: the peak is reset through /proc/self/clear_refs as an update starts, at TRL's batch_generation
call, and read as VmHWM as it ends, at the next one or when train() returns; what a side holds only within an
update, its logits above all, where peak RSS adds imports, models and optimizer state); model FLOP/s as a fraction
of the dense matmul peak the parent measures at the same thread count just before the runs (1024^3, median of 10;
fp32, and bf16 for the bf16 side). Useful FLOPs per episode of S = prompt + response real tokens, r of them
response, with E PPO epochs, counted the same way on every side from its own episodes:

    (4 + 6 E) * (2 * N * S + 2 * L * d * S * (S + 1))  +  (2 + 3 E) * 2 * V * d * r

N the trunk's non-embedding parameters (layers and final norm), L layers, hidden size d, vocabulary V (the forward
count of benchmarks/common.py). The trunks run 4 + 6 E forward-equivalents: four forwards (sampling, reference,
value, reward) and, per epoch, forward and backward (3 forwards) of policy and value. lm_head counts only where a
response token is predicted, in the policy and the reference: 2 + 3 E forward-equivalents. The score heads (d -> 1)
are left out. Ratios are ours / TRL's over neighbouring runs (> 1: ours is faster or, for memory, larger), the
median with the range in brackets.

The machine line under the command names the CPU's flags that set fp32 and bf16 matmul speed (avx2, avx512f,
avx512_bf16, amx_tile, amx_bf16: present, then absent).

Usage (2-core machine; the default run measured at 14 min 24 s on 2026-12-06, load average ~1):
    python benchmarks/bench_ppo.py                                # toy and spread at 1 and 2 threads, 3 repeats;
                                                                  # then qwen-vocab, 1 thread, 1 repeat (~3.5 min)
    python benchmarks/bench_ppo.py --dataset qwen-vocab           # minirlhf's and TRL's memory under a
                                                                  # 151,936-token vocabulary
    python benchmarks/bench_ppo.py --dataset toy --threads 1 --sides all
    python benchmarks/bench_ppo.py --quick                        # 1 repeat, 1 thread, 2 updates: checks that
                                                                  # it runs
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import csv, forward_flops, machine_line, matmul_peak, ratio, reset_peak_rss, rss_mib, run_child, table

BATCH, PPO_EPOCHS, TEMPERATURE, SEED = 8, 4, 0.7, 1000
MODEL = dict(vocab_size=16384, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=688, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None)
EOS = 2
DATASETS = {"toy": dict(prompt=(16, 24), response_length=24, stop=False, updates=6),
            "spread": dict(prompt=(20, 200), response_length=128, stop=True, updates=3),
            # a memory case: `model` overrides MODEL's keys, `epochs` PPO_EPOCHS, and its default `threads` and
            # `repeats` are its own (the others': 1,2 and 3)
            "qwen-vocab": dict(prompt=(16, 24), response_length=256, stop=False, updates=2, epochs=1, threads=[1],
                               repeats=1, model=dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=4,
                                                     intermediate_size=256))}
SIDES = {"ours": "minirlhf", "ours-padded": "minirlhf padded", "trl": "TRL 1.12, bf16=true",
         "ours-bf16": "minirlhf, bf16=true", "ours-lora": "minirlhf LoRA r=16"}
DEFAULT_SIDES = ["ours", "ours-padded", "trl"]


# ---------------------------------------------------------------------------------------------------------------------
# The shared inputs, written once per dataset by the parent


def model_config(spec: dict) -> dict:
    """The LlamaConfig keys of a dataset's models: MODEL, with the dataset's own `model` keys over it."""
    return {**MODEL, **spec.get("model", {})}


@torch.no_grad()
def emit_stop_at_rate(policy, rate: float) -> float:
    """Make a random-weight LlamaForCausalLM sample EOS with probability ~`rate` at every step (module docstring).
    Returns the mean and spread of the final norm's dimension 0 on random contexts, for the report."""
    policy.model.embed_tokens.weight[:, 0] = 1.0
    policy.lm_head.weight[:, 0] = 0.0
    policy.lm_head.weight[EOS] = 0.0
    ids = torch.randint(3, policy.config.vocab_size, (4, 200), generator=torch.Generator().manual_seed(1))
    hidden = policy.model(ids).last_hidden_state  # (4, 200, d)
    others = torch.logsumexp(policy.lm_head(hidden) / TEMPERATURE, -1).mean()  # EOS's logit is 0 here
    h0 = hidden[..., 0].mean()
    policy.lm_head.weight[EOS, 0] = (others + math.log(rate / (1 - rate))) * TEMPERATURE / h0
    return h0.item(), hidden[..., 0].std().item()


def build(folder: Path, dataset: str, n_prompts: int) -> dict:
    """Random Llama policy and seq-cls reward model, a word-level tokenizer with an added [PAD], and prompts, in
    folder/<dataset>; returns the parameter counts."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    spec, out = DATASETS[dataset], folder / dataset
    config = model_config(spec)
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    info = {"params": policy.num_parameters(), "trunk": policy.model.num_parameters() -
            policy.model.embed_tokens.weight.numel()}
    if spec["stop"]:
        info["h0"] = emit_stop_at_rate(policy, 3 / spec["response_length"])
    policy.save_pretrained(out / "policy")
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**config, num_labels=1)).save_pretrained(
        out / "reward")
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": EOS, **{f"t{i}": i for i in range(3, config["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                                     padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(out / "policy")
    lengths = torch.randint(spec["prompt"][0], spec["prompt"][1] + 1, (n_prompts,)).tolist()
    prompts = [torch.randint(3, config["vocab_size"], (n,)).tolist() for n in lengths]
    (out / "prompts.json").write_text(json.dumps(prompts))
    return info


def episode_lengths(queries: torch.Tensor, query_responses: torch.Tensor, pad: int, stop: bool) -> list[list[int]]:
    """[prompt tokens, response tokens] per row: the response up to and including its first EOS when stopping at EOS
    (TRL pads finished rows with EOS, we with [PAD]), else all of it."""
    prompt = (queries != pad).sum(1)
    responses = query_responses[:, queries.shape[1]:]
    is_eos = responses == EOS
    width = torch.full_like(prompt, responses.shape[1])
    response = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, width) if stop else width
    return torch.stack([prompt, response], 1).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# The child processes: one PPO run each, printing one JSON line


def run_ours(folder: Path, spec: dict, precision: torch.dtype | None, lora: bool, padded: bool) -> dict:
    """minirlhf's loop (ppo.main's steps 1-2): update wall times, sampling seconds and episodes after the first."""
    from minirlhf import ppo, rollout
    from minirlhf.data import collate_prompts
    from minirlhf.infra.hf import load_pretrained
    from minirlhf.infra.lora import LORA_DEFAULT, adapters_disabled, add_lora
    from minirlhf.infra.packing import PaddingFreeCausalLM, PaddingFreeRewardModel
    from minirlhf.infra.run import autocast
    from minirlhf.infra.tokenizer import Tokenizer
    from minirlhf.model import CausalLM, PolicyAndValue, RewardModel
    from minirlhf.optim import AdamW, param_groups

    prompts = [{"input_ids": p} for p in json.loads((folder / "prompts.json").read_text())]
    stop_token_id = EOS if spec["stop"] else None
    args = ppo.PPOConfig(per_device_train_batch_size=BATCH, local_rollout_forward_batch_size=BATCH,
                         response_length=spec["response_length"], num_ppo_epochs=spec.get("epochs", PPO_EPOCHS),
                         total_episodes=len(prompts), learning_rate=1e-5, max_grad_norm=0,
                         gradient_checkpointing=False, temperature=TEMPERATURE,
                         stop_token="eos" if spec["stop"] else None, **({"padding_free": False} if padded else {}))
    args.set_runtime_sizes(1, len(prompts))
    pad = Tokenizer.from_pretrained(folder / "policy").pad_token_id
    # padding_free: the models' padding-free twins, as ppo's setup loads them
    causal_lm, reward_cls = (CausalLM, RewardModel) if padded else (PaddingFreeCausalLM, PaddingFreeRewardModel)
    policy = load_pretrained(causal_lm, str(folder / "policy"))
    ref_policy = None if lora else load_pretrained(causal_lm, str(folder / "policy"))
    if lora:  # PPO's dropout is off, so the adapters' too
        add_lora(policy, r=16, alpha=32, dropout=0.0, target_modules=LORA_DEFAULT)
    value_model, reward_model = (load_pretrained(reward_cls, str(folder / "reward")) for _ in range(2))
    model = PolicyAndValue(policy, value_model).train()
    optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
    times, sampling, episodes, growth = [], 0.0, [], []
    for update in range(1, args.num_total_batches + 1):
        start_rss, start = reset_peak_rss(), time.perf_counter()
        queries = collate_prompts(prompts[(update - 1) * BATCH : update * BATCH], pad)["input_ids"]  # file order
        torch.manual_seed(SEED + update)  # TRL's side seeds the same before the same update's sampling
        with autocast(queries.device, precision):
            query_responses, logprobs = rollout.sample_responses(policy, queries, args, pad, stop_token_id)
        if update > 1:
            sampling += time.perf_counter() - start
            episodes += episode_lengths(queries, query_responses, pad, spec["stop"])
        with autocast(queries.device, precision), adapters_disabled(policy):  # LoRA: the reference is the base
            rollouts = rollout.score_responses(ref_policy or policy, value_model, reward_model, queries,
                                               query_responses, logprobs, args, pad, stop_token_id)
        batch = ppo.compute_advantages(rollouts, args, EOS)
        ppo.ppo_update(model, optimizer, batch, args, pad, ppo.minibatch_orders(args, update), precision)
        times.append(time.perf_counter() - start)
        growth.append(rss_mib("VmHWM") - start_rss)
    return {"update_s": times[1:], "sampling_s": sampling, "episodes": episodes,
            "autocast": "bf16" if precision else "no", "rss_growth_mib": growth[1:]}


def run_trl(folder: Path, spec: dict, output_dir: str) -> dict:
    """The same for TRL, and its accelerator's mixed precision: update boundaries and sampling time from a wrapper
    around its batch_generation."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import transformers
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    transformers.logging.set_verbosity_error()
    prompts = json.loads((folder / "prompts.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "policy")
    calls = []  # (start, end, episodes) of each update's generation
    start_rss, growth = [], []  # each update's resident memory at its start; its growth (peak - start)
    original = ppo_trainer.batch_generation

    def timed_batch_generation(model, queries, *args, **kwargs):
        if start_rss:  # the previous update ends here
            growth.append(rss_mib("VmHWM") - start_rss[-1])
        start_rss.append(reset_peak_rss())
        start = time.perf_counter()
        torch.manual_seed(SEED + len(calls) + 1)  # as ours before the same update's sampling
        query_responses, logits = original(model, queries, *args, **kwargs)
        episodes = episode_lengths(queries, query_responses, tokenizer.pad_token_id, spec["stop"])
        calls.append((start, time.perf_counter(), episodes))
        return query_responses, logits

    ppo_trainer.batch_generation = timed_batch_generation
    args = PPOConfig(output_dir=output_dir, per_device_train_batch_size=BATCH, local_rollout_forward_batch_size=BATCH,
                     response_length=spec["response_length"], num_ppo_epochs=spec.get("epochs", PPO_EPOCHS),
                     total_episodes=len(prompts),
                     learning_rate=1e-5, temperature=TEMPERATURE, stop_token="eos" if spec["stop"] else None,
                     num_sample_generations=0, bf16=True, use_cpu=True, report_to="none", save_strategy="no",
                     disable_tqdm=True)
    dataset = datasets.Dataset.from_dict({"input_ids": prompts})
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer,
        model=transformers.AutoModelForCausalLM.from_pretrained(folder / "policy"), ref_model=None,
        reward_model=transformers.AutoModelForSequenceClassification.from_pretrained(folder / "reward"),
        value_model=transformers.AutoModelForSequenceClassification.from_pretrained(folder / "reward"),
        train_dataset=dataset, eval_dataset=dataset)
    # prompts in file order, as on our side (TRL's own dataloader shuffles, with a different generator)
    trainer.dataloader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=trainer.data_collator,
                                                     drop_last=True)
    trainer.train()
    growth.append(rss_mib("VmHWM") - start_rss[-1])
    ends = [start for start, _, _ in calls[1:]] + [time.perf_counter()]
    times = [end - start for (start, _, _), end in zip(calls, ends, strict=True)]
    return {"update_s": times[1:], "sampling_s": sum(end - start for start, end, _ in calls[1:]),
            "episodes": [e for _, _, episodes in calls[1:] for e in episodes],
            "autocast": trainer.accelerator.mixed_precision, "rss_growth_mib": growth[1:]}


def child(side: str, folder: Path, dataset: str) -> None:
    spec = DATASETS[dataset]
    with tempfile.TemporaryDirectory() as output_dir:
        if side == "trl":
            result = run_trl(folder / dataset, spec, output_dir)
        else:
            result = run_ours(folder / dataset, spec, torch.bfloat16 if side == "ours-bf16" else None,
                              lora=side == "ours-lora", padded=side == "ours-padded")
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------------
# The parent: alternate the sides, collect medians, print one table per (dataset, threads)


def metrics(run: dict, flops_per_episode) -> dict:
    """One run's rates from its timed updates."""
    seconds, responses = sum(run["update_s"]), sum(r for _, r in run["episodes"])
    flops = sum(flops_per_episode(p, r) for p, r in run["episodes"])
    return {"episodes_s": len(run["episodes"]) / seconds, "response_tok_s": responses / seconds,
            "mean_response": responses / len(run["episodes"]),
            "mean_prompt": sum(p for p, _ in run["episodes"]) / len(run["episodes"]),
            "gen_tok_s": responses / run["sampling_s"], "update_s": statistics.median(run["update_s"]),
            "peak_rss_mib": run["peak_rss_mib"], "rss_growth_mib": max(run["rss_growth_mib"]),
            "flop_s": flops / seconds}


def report(dataset: str, threads: int, peaks: dict, load: tuple[float, float], runs: dict, info: dict) -> str:
    """The markdown table of one (dataset, threads) group, a row per side."""
    spec, config = DATASETS[dataset], model_config(DATASETS[dataset])
    d, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    E = spec.get("epochs", PPO_EPOCHS)

    def flops_per_episode(p: int, r: int) -> float:  # the module docstring's count
        return (4 + 6 * E) * forward_flops([p + r], info["trunk"], L, d) + (2 + 3 * E) * 2 * V * d * r

    m = {side: [metrics(r, flops_per_episode) for r in rs] for side, rs in runs.items()}
    rows = []
    for side, ms in m.items():
        med = {k: statistics.median(x[k] for x in ms) for k in ms[0]}
        autocast = "/".join(sorted({r["autocast"] for r in runs[side]}))
        peak = peaks["bf16" if autocast == "bf16" else "fp32"]
        same = sum(a == b for a, b in zip(runs[side][0]["episodes"], runs["trl"][0]["episodes"], strict=True))
        versus = (["", "", "", ""] if side == "trl" else
                  [ratio([x[k] for x in ms], [x[k] for x in m["trl"]])
                   for k in ("episodes_s", "response_tok_s", "peak_rss_mib", "rss_growth_mib")])
        rows.append([SIDES[side], autocast, f"{med['episodes_s']:.2f}", f"{med['response_tok_s']:,.0f}",
                     f"{med['mean_prompt']:.0f} + {med['mean_response']:.0f}",
                     "" if side == "trl" else f"{same}/{len(runs['trl'][0]['episodes'])}", f"{med['gen_tok_s']:,.0f}",
                     f"{med['update_s']:.2f}", f"{med['peak_rss_mib']:,.0f}", f"{med['rss_growth_mib']:,.0f}",
                     f"{med['flop_s'] / 1e9:.1f}",
                     f"{100 * med['flop_s'] / peak:.0f}%", *versus])
    title = (f"**{dataset}, {threads} thread{'s' if threads > 1 else ''}**: prompts {spec['prompt'][0]}-"
             f"{spec['prompt'][1]} tokens, response_length {spec['response_length']}"
             f"{', stop at EOS' if spec['stop'] else ', no stop token'}; {spec['updates'] - 1} timed update"
             f"{'s' if spec['updates'] > 2 else ''} of {BATCH} episodes, {E} PPO epoch{'s' if E > 1 else ''}; matmul "
             "peak " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
             + f"; load average {load[0]:.1f} before, {load[1]:.1f} after\n\n")
    return title + table(["side", "autocast", "episodes/s", "response tok/s", "mean prompt + response",
                          "lengths as TRL's", "generation tok/s", "s/update", "peak RSS MiB", "update RSS growth MiB",
                          "model GFLOP/s", "of peak", "episodes/s vs TRL", "response tok/s vs TRL", "peak RSS vs TRL",
                          "update growth vs TRL"], rows, left=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 2 updates (1 timed), 1 thread (unless --threads): checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side (default 3, qwen-vocab 1; quick 1)")
    parser.add_argument("--threads", type=csv(int), default=None,
                        help="thread counts, each run at every one (default 1,2, qwen-vocab 1; quick 1)")
    parser.add_argument("--dataset", type=csv(), default=list(DATASETS),
                        help=f"of {', '.join(DATASETS)} (default all)")
    parser.add_argument("--sides", type=csv(), default=DEFAULT_SIDES,
                        help=f"of {', '.join(SIDES)}, or all (default {','.join(DEFAULT_SIDES)})")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "FOLDER", "DATASET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads[0])
        child(args.child[0], Path(args.child[1]), args.child[2])
        return

    if args.sides == ["all"]:
        args.sides = list(SIDES)
    unknown = set(args.dataset) - set(DATASETS) | set(args.sides) - set(SIDES)
    if unknown or "trl" not in args.sides:
        parser.error(f"unknown names {sorted(unknown)}" if unknown else "--sides needs trl (the baseline)")
    from minirlhf.ppo import PPOConfig

    sides = [s for s in SIDES if s in args.sides]
    if "ours-padded" in sides and "padding_free" not in {f.name for f in dataclasses.fields(PPOConfig)}:
        sides.remove("ours-padded")
        print("note: this minirlhf's PPOConfig has no padding_free key: no 'minirlhf padded' runs", file=sys.stderr)
    print(f"$ python {shlex.join(sys.argv)}\n{machine_line()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for dataset in args.dataset:
            spec = DATASETS[dataset] = {**DATASETS[dataset], **({"updates": 2} if args.quick else {})}
            config = model_config(spec)
            threads = args.threads or ([1] if args.quick else spec.get("threads", [1, 2]))
            repeats = args.repeats or (1 if args.quick else spec.get("repeats", 3))
            info = build(folder, dataset, BATCH * spec["updates"])
            note = (f"; EOS emitted at rate 3/{spec['response_length']} (final-norm dimension 0: {info['h0'][0]:.2f} "
                    f"+- {info['h0'][1]:.2f})" if spec["stop"] else "")
            print(f"{dataset}: Llama policy {info['params'] / 1e6:.1f}M parameters ({info['trunk'] / 1e6:.1f}M in "
                  f"the trunk: {config['num_hidden_layers']} layers of {config['hidden_size']}; vocab "
                  f"{config['vocab_size']:,}, untied lm_head), reward and value models of the same "
                  f"trunk; fp32 weights, CPU; median of {repeats} run(s) per side{note}\n", flush=True)
            for n_threads in threads:
                load_before = os.getloadavg()[0]
                peaks = {"fp32": matmul_peak(n_threads, torch.float32),
                         **({"bf16": matmul_peak(n_threads, torch.bfloat16)} if "ours-bf16" in sides else {})}
                runs = {side: [] for side in sides}
                for _ in range(repeats):
                    for side in sides:
                        r = run_child([__file__, "--child", side, str(folder), dataset], n_threads,
                                      folder / "child.log")
                        runs[side].append(r)
                        print(f"[bench_ppo] {dataset}, {n_threads} thread(s), {SIDES[side]}: "
                              f"{len(r['episodes']) / sum(r['update_s']):.2f} episodes/s, peak RSS "
                              f"{r['peak_rss_mib']:,.0f} MiB", file=sys.stderr, flush=True)
                print(report(dataset, n_threads, peaks, (load_before, os.getloadavg()[0]), runs, info) + "\n",
                      flush=True)


if __name__ == "__main__":
    main()
