"""Log-probabilities without (B, T, vocab) logits: the memory and time of PPO's reference scoring and of one PPO
update, this tree vs an earlier commit (`--before`, default the last one that made the whole logits), side by side.

Both sides run the same child code against their own `minirlhf` (the earlier one exported with `git archive` into a
temporary folder and put first on PYTHONPATH): random models built from a ModelConfig (the padding-free twins, PPO's
default), one batch of rollouts made up the same way on both sides (left-padded prompts, responses that stop at EOS
at different lengths, behaviour and reference log-probs, values and scores), then
- scoring: `rollout.score_responses` (reference log-probs, values, scores; the policy serves as the reference);
- update: `ppo.ppo_update` over that batch (one PPO epoch, one minibatch, micro-batches of --micro-batch rows),
  policy and value model with AdamW, the first update in a fresh process, then a second one that is only timed.
Memory: the growth of resident memory during the phase (peak RSS reset through /proc/self/clear_refs just before,
then VmHWM - VmRSS before, as bench_model.py measures a step; the first update includes the gradients and AdamW's
moments, the same on both sides), and the child's whole peak RSS (ru_maxrss). Time: the phase's wall time; for
the update the second one. Each side runs --repeats fresh children, alternating; medians, and after / before ratios
over neighbouring runs.

Shapes (--shapes): "qwen-vocab", a tiny trunk (2 layers of 64) under Qwen2's 151,936-token vocabulary, where the
logits are nearly all the memory; "toy", bench_ppo.py's model (4 layers of 256, vocabulary 16,384, 24 response
tokens, 4 PPO epochs), where one chunk holds all the logits, to check that nothing got slower.

Usage:
    python benchmarks/bench_logprobs.py                      # both shapes, 3 repeats, 1 thread: ~6 min
    python benchmarks/bench_logprobs.py --shapes qwen-vocab --response-length 256 --repeats 1
"""

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import csv, machine_line, ratio, run_child, table

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "56560cb"  # the last commit whose scoring and update made the (B, T, vocab) logits
SHAPES = {
    "qwen-vocab": dict(model=dict(vocab_size=151936, hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
                                  intermediate_size=256), batch=8, context=16, response_length=128, ppo_epochs=1),
    "toy": dict(model=dict(vocab_size=16384, hidden_size=256, num_layers=4, num_heads=8, head_dim=32,
                           intermediate_size=688), batch=8, context=20, response_length=24, ppo_epochs=4),
}
PAD, EOS = 0, 2


def proc_status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measured(fn) -> tuple[float, float]:
    """(seconds, MiB of resident memory growth) of fn()."""
    before = proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, (proc_status_kib("VmHWM") - before) / 1024


def child(phase: str, shape: dict, micro_batch: int) -> dict:
    from minirlhf import ppo, rollout
    from minirlhf.infra.packing import PaddingFreeCausalLM, PaddingFreeRewardModel
    from minirlhf.model import ModelConfig, PolicyAndValue
    from minirlhf.optim import AdamW, param_groups

    B, T, context = shape["batch"], shape["response_length"], shape["context"]
    cfg = ModelConfig(model_type="llama", num_kv_heads=shape["model"]["num_heads"], max_position_embeddings=1024,
                      rotary_dim=shape["model"]["head_dim"], sliding_windows=[None] * shape["model"]["num_layers"],
                      pad_token_id=PAD, **shape["model"])
    torch.manual_seed(0)
    policy, value_model = PaddingFreeCausalLM(cfg), PaddingFreeRewardModel(cfg)
    args = ppo.PPOConfig(per_device_train_batch_size=micro_batch, gradient_accumulation_steps=B // micro_batch,
                         local_rollout_forward_batch_size=B, response_length=T, num_ppo_epochs=shape["ppo_epochs"],
                         total_episodes=B, learning_rate=1e-5, max_grad_norm=0, temperature=0.7, stop_token="eos",
                         gradient_checkpointing=False)
    args.set_runtime_sizes(1, B)
    g = torch.Generator().manual_seed(1)
    queries = torch.randint(3, cfg.vocab_size, (B, context), generator=g)
    for b in range(B):
        queries[b, : b % 4] = PAD  # left padding
    responses = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    for b in range(B // 2):  # half the responses stop at EOS, at different lengths; the rest run to the end
        stop = (b + 1) * T // (B // 2 + 1)
        responses[b, stop], responses[b, stop + 1 :] = EOS, PAD
    query_responses = torch.cat([queries, responses], 1)
    logprobs = -3 * torch.rand(B, T, generator=g)
    if phase == "scoring":
        seconds, growth = measured(lambda: rollout.score_responses(policy, value_model, value_model, queries,
                                                                   query_responses, logprobs, args, PAD, EOS))
        return {"seconds": seconds, "growth_mib": growth}
    with torch.no_grad():
        rollouts = rollout.score_responses(policy, value_model, value_model, queries, query_responses, logprobs,
                                           args, PAD, EOS)
    batch = ppo.compute_advantages(rollouts, args, EOS)
    model = PolicyAndValue(policy, value_model).train()
    optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
    orders = [torch.arange(B)] * args.num_ppo_epochs
    update = lambda: ppo.ppo_update(model, optimizer, batch, args, PAD, orders)  # noqa: E731
    _, growth = measured(update)  # the first update: gradients and AdamW's moments come into being
    seconds, _ = measured(update)
    return {"seconds": seconds, "growth_mib": growth}


def export(ref: str, folder: Path) -> Path:
    """minirlhf/ of a git ref, in folder/<ref>; returns the folder to put on PYTHONPATH."""
    out = folder / ref
    out.mkdir()
    archive = subprocess.run(["git", "archive", ref, "minirlhf"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help=f"git ref of the earlier side (default {BEFORE})")
    parser.add_argument("--shapes", type=csv(), default=list(SHAPES), help=f"of {', '.join(SHAPES)} (default both)")
    parser.add_argument("--response-length", type=int, default=None, help="override the shapes' response length")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward in the update")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=csv(int), default=[1])
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "SHAPE_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads[0])
        result = child(args.child[0], json.loads(args.child[1]), args.micro_batch)
        result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    print(f"$ python {shlex.join(sys.argv)}\n{machine_line()}\n")
    flags = sorted(set(re.findall(r"\b(avx2|avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text())))
    with tempfile.TemporaryDirectory() as tmp:
        trees = {f"before ({args.before})": export(args.before, Path(tmp)), "after (this tree)": ROOT}
        for name in args.shapes:
            shape = {**SHAPES[name], **({"response_length": args.response_length} if args.response_length else {})}
            m = shape["model"]
            logits_mib = args.micro_batch * (shape["response_length"] + 1) * m["vocab_size"] * 4 / 2**20
            print(f"**{name}**: vocabulary {m['vocab_size']:,}, {m['num_layers']} layers of {m['hidden_size']}; "
                  f"{shape['batch']} rollouts of {shape['context']} + {shape['response_length']} tokens, micro-batches "
                  f"of {args.micro_batch}, {shape['ppo_epochs']} PPO epoch(s); one fp32 copy of a micro-batch's "
                  f"logits: {logits_mib:,.0f} MiB; CPU flags {', '.join(flags)}\n")
            for threads in args.threads:
                rows = []
                for phase in ("scoring", "update"):
                    runs = {side: [] for side in trees}
                    for _ in range(args.repeats):
                        for side, tree in trees.items():
                            cmd = [__file__, "--child", phase, json.dumps(shape), "--micro-batch",
                                   str(args.micro_batch)]
                            runs[side].append(run_child(cmd, threads, Path(tmp) / "child.log",
                                                        env={"PYTHONPATH": str(tree)}))
                    for side, rs in runs.items():
                        med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "growth_mib",
                                                                                  "maxrss_mib")}
                        versus = [""] * 3 if side.startswith("before") else [
                            ratio([r[k] for r in rs], [r[k] for r in next(iter(runs.values()))])
                            for k in ("growth_mib", "maxrss_mib", "seconds")]
                        rows.append([phase, side, f"{med['growth_mib']:,.0f}", f"{med['maxrss_mib']:,.0f}",
                                     f"{med['seconds']:.3f}", *versus])
                print(f"{threads} thread(s), median of {args.repeats}, load average {os.getloadavg()[0]:.1f}\n")
                print(table(["phase", "side", "RSS growth MiB", "peak RSS MiB", "seconds", "growth after/before",
                             "peak after/before", "time after/before"], rows, left=2) + "\n", flush=True)


if __name__ == "__main__":
    main()
