"""Where a PPO update's time goes: torch.profiler over one update of bench_ppo.py's runs (issue 19, item 1).

Each side (minirlhf padding-free, minirlhf padded, TRL 1.12's PPOTrainer) runs bench_ppo's own setup (its run_ours /
run_trl, the same models, prompts, seeds and settings) for five updates in its own subprocess at one thread: the second
runs under torch.profiler (record_shapes, with_flops), and the three after it, unprofiled, give each phase's wall time,
median and range (the profiler slows small ops, so its seconds run above these). Phases are marked with record_function
ranges put in by monkeypatching: sampling (minirlhf.rollout.sample_responses; TRL's batch_generation), scoring
(score_responses; TRL's no-grad `forward`, `get_reward` and `selective_log_softmax` calls) and the PPO epochs
(minirlhf.ppo.ppo_update; TRL: from its first grad-enabled `forward` to the `empty_cache` after its last minibatch).
Every op's self CPU time goes to the innermost phase around it, and inside the PPO epochs to one category, by name and
input shapes, the first that fits: AdamW (under torch's Optimizer.step# range; minirlhf's AdamW gets the same range from
this script), attention (scaled_dot_product / flash attention ops, forward and backward), lm_head (mm/addmm/bmm with a
vocabulary-sized dimension), trunk matmuls (the other mm/addmm/bmm), log-softmax/entropy (softmax/log_softmax/logsumexp
ops and their backward, and any other op on a tensor whose last dimension is the vocabulary: the temperature division,
gather), other (element-wise ops, indexing, embedding, Python time between ops, which the ranges' own self time holds).
"outside phases" is the update's wall time less the phases (advantages, TRL's metrics and logging).

Useful GFLOP: bench_ppo's count (its module docstring) of each side's own episodes, split by phase: sampling one
trunk forward and lm_head at response positions, scoring three trunk forwards and lm_head for the reference, the PPO
epochs 6E trunk forward-equivalents (the 2NS part in the trunk-matmul row, the 2LdS(S+1) part in the attention row)
and 3E lm_head. Executed GFLOP: the profiler's count of the mm/addmm/bmm actually run (padding included), plus, for
fused attention kernels, which the profiler does not count, 4 B H T S d_head per forward and 2.5x that per backward
(it recomputes the scores) from their input shapes. "of peak": useful GFLOP/s over the 1-thread fp32 matmul peak
(benchmarks/common.py's, 1024^3, median of 10), the best of the parent's measurement before the runs and each
child's before and after its profile: a busy neighbour can halve one measurement, never raise it. The profiler
slows small ops (more Python per op), so seconds here run above bench_ppo's.

Usage: python benchmarks/profile_ppo.py [--dataset toy,spread] [--sides ours,ours-padded,trl]   (~5 min on 2 cores)
"""

import argparse
import collections
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_ppo import BATCH, DATASETS, MODEL, PPO_EPOCHS, build, episode_lengths, run_ours, run_trl
from common import csv, forward_flops, machine_line, matmul_peak, run_child, table

SIDES = {"ours": "minirlhf", "ours-padded": "minirlhf padded", "trl": "TRL 1.12"}
ROWS = ["sampling", "scoring", "PPO: trunk matmuls", "PPO: lm_head", "PPO: log-softmax/entropy", "PPO: attention",
        "PPO: AdamW", "PPO: other", "PPO epochs", "outside phases", "whole update"]
UPDATES = 5  # a warm-up, the profiled one, then three timed without the profiler
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
FUSED_ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
                   "aten::_scaled_dot_product_flash_attention")


# ---------------------------------------------------------------------------------------------------------------------
# The child: profile the second update of one side


class Profiled:
    """The profiler over the second update, wall-clock timers over the later ones (no profiler: its overhead is not in
    them), and the phase ranges opened and closed from the monkeypatches."""

    def __init__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                           with_flops=True)
        self.on, self.timing, self.updates, self.open, self.episodes = False, False, 0, {}, []
        self.wall, self.wall_episodes = [], []  # per unprofiled update: phase -> seconds; its episodes

    def start_update(self):
        self.updates += 1
        self.on, self.timing = self.updates == 2, self.updates > 2
        if self.on:
            self.prof.start()
        elif self.timing:
            self.wall.append(collections.Counter())
        self.start = time.perf_counter()

    def begin(self, phase: str):
        if (self.on or self.timing) and phase not in self.open:
            self.open[phase] = (torch.profiler.record_function(f"phase:{phase}") if self.on else None,
                                time.perf_counter())
            if self.on:
                self.open[phase][0].__enter__()

    def end(self, phase: str):
        if phase in self.open:
            ranged, start = self.open.pop(phase)
            if ranged is not None:
                ranged.__exit__(None, None, None)
            else:
                self.wall[-1][phase] += time.perf_counter() - start

    def stop(self):
        for phase in list(self.open):
            self.end(phase)
        if self.on:
            self.seconds = time.perf_counter() - self.start
            self.prof.stop()
        elif self.timing:
            self.wall[-1]["whole update"] = time.perf_counter() - self.start
        self.on = self.timing = False

    def record(self, episodes):
        if self.on:
            self.episodes = episodes
        elif self.timing:
            self.wall_episodes.append(episodes)

    def wrap(self, fn, phase: str, grad: bool | None = None):
        """fn inside a `phase` range while profiling or timing (and, unless grad is None, while grad mode is `grad`)."""
        def wrapped(*args, **kwargs):
            if not (self.on or self.timing) or phase in self.open or grad not in (None, torch.is_grad_enabled()):
                return fn(*args, **kwargs)
            self.begin(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.end(phase)
        return wrapped


def profile_ours(folder: Path, spec: dict, padded: bool) -> Profiled:
    from minirlhf import optim, ppo, rollout

    p, sample, update = Profiled(), rollout.sample_responses, ppo.ppo_update

    def sample_responses(policy, queries, args, pad, stop_token_id):
        p.start_update()
        out = p.wrap(sample, "sampling")(policy, queries, args, pad, stop_token_id)
        p.record(episode_lengths(queries, out[0], pad, spec["stop"]))
        return out

    def ppo_update(*args, **kwargs):
        out = p.wrap(update, "ppo")(*args, **kwargs)
        p.stop()
        return out

    rollout.sample_responses, ppo.ppo_update = sample_responses, ppo_update
    optim.AdamW.step = torch.profiler.record_function("Optimizer.step#AdamW.step")(optim.AdamW.step)  # torch's name
    rollout.score_responses = p.wrap(rollout.score_responses, "scoring")
    run_ours(folder, spec, None, lora=False, padded=padded)
    return p


def profile_trl(folder: Path, spec: dict, output_dir: str) -> Profiled:
    import transformers
    from trl.experimental.ppo import ppo_trainer

    p, generation, forward, empty_cache = (Profiled(), ppo_trainer.batch_generation, ppo_trainer.forward,
                                           ppo_trainer.empty_cache)
    pad = transformers.AutoTokenizer.from_pretrained(folder / "policy").pad_token_id
    train_forwards = collections.Counter()

    def batch_generation(model, queries, *args, **kwargs):
        p.start_update()
        out = p.wrap(generation, "sampling")(model, queries, *args, **kwargs)
        p.record(episode_lengths(queries, out[0], pad, spec["stop"]))
        return out

    def train_forward(*args, **kwargs):  # no grad: the reference's forward; with grad: the PPO epochs begin
        if not torch.is_grad_enabled():
            return p.wrap(forward, "scoring")(*args, **kwargs)
        p.begin("ppo")
        train_forwards[p.updates] += 1
        return forward(*args, **kwargs)

    def empty_cache_after():  # called after each minibatch: the last one ends the PPO epochs
        if train_forwards[p.updates] == PPO_EPOCHS:
            p.end("ppo")
        empty_cache()

    def on_step_end(self, *args, **kwargs):
        p.stop()
        return on_step_end_original(self, *args, **kwargs)

    ppo_trainer.batch_generation, ppo_trainer.forward, ppo_trainer.empty_cache = (batch_generation, train_forward,
                                                                                  empty_cache_after)
    ppo_trainer.get_reward = p.wrap(ppo_trainer.get_reward, "scoring")
    ppo_trainer.selective_log_softmax = p.wrap(ppo_trainer.selective_log_softmax, "scoring", grad=False)
    on_step_end_original = transformers.trainer_callback.CallbackHandler.on_step_end
    transformers.trainer_callback.CallbackHandler.on_step_end = on_step_end
    run_trl(folder, spec, output_dir)
    return p


def lineage(ev):
    """The event and its ancestors, innermost first."""
    while ev is not None:
        yield ev
        ev = ev.cpu_parent


def category(ev, vocab: int) -> str:
    """The PPO-epoch row of one op (module docstring's order)."""
    names = [e.name.lower().replace("_", "") for e in lineage(ev)]
    if any(e.name.startswith("Optimizer.step#") for e in lineage(ev)):
        return "PPO: AdamW"
    if any("scaleddotproduct" in n or "flashattention" in n for n in names):
        return "PPO: attention"
    if ev.name in MATMULS:
        return "PPO: lm_head" if any(vocab in shape for shape in ev.input_shapes) else "PPO: trunk matmuls"
    if any("softmax" in n or "logsumexp" in n for n in names) or any(
            shape and shape[-1] == vocab for shape in ev.input_shapes if isinstance(shape, list)):
        return "PPO: log-softmax/entropy"
    return "PPO: other"


def executed_flops(ev) -> float:
    if ev.name in MATMULS:
        return ev.flops or 0.0
    if ev.name.startswith(FUSED_ATTENTION):  # backward: (grad_out, query, key, ...)
        backward = "backward" in ev.name
        (B, H, T, d), key = ev.input_shapes[1:3] if backward else ev.input_shapes[:2]
        return 4 * B * H * T * key[2] * d * (2.5 if backward else 1)
    return 0.0


def child(side: str, folder: Path, dataset: str) -> None:
    spec, peaks = {**DATASETS[dataset], "updates": UPDATES}, [matmul_peak(1, torch.float32)]
    with tempfile.TemporaryDirectory() as output_dir:
        p = (profile_trl(folder / dataset, spec, output_dir) if side == "trl" else
             profile_ours(folder / dataset, spec, padded=side == "ours-padded"))
    seconds, flops = collections.Counter(), collections.Counter()
    ops = collections.defaultdict(collections.Counter)  # PPO row -> op name -> self seconds
    for ev in p.prof.events():
        phase = next((e.name[6:] for e in lineage(ev) if e.name.startswith("phase:")), None)
        if phase is None:
            continue
        row = category(ev, MODEL["vocab_size"]) if phase == "ppo" else phase
        seconds[row] += ev.self_cpu_time_total / 1e6
        flops[row] += executed_flops(ev)
        if phase == "ppo":
            ops[row][ev.name] += ev.self_cpu_time_total / 1e6
            if ev.name not in MATMULS:
                ops["PPO epochs, outside matmuls"][ev.name] += ev.self_cpu_time_total / 1e6
    peaks.append(matmul_peak(1, torch.float32))
    print(json.dumps({"peaks": peaks, "seconds": seconds, "flops": flops, "whole": p.seconds, "episodes": p.episodes,
                      "top": {row: c.most_common(5) for row, c in ops.items()}, "wall": p.wall,
                      "wall_episodes": p.wall_episodes}))


# ---------------------------------------------------------------------------------------------------------------------
# The parent: build the inputs, run the sides, print a table per dataset


def useful_flops(episodes: list[list[int]], trunk: int) -> dict:
    """bench_ppo's useful FLOPs of these (prompt, response) episodes, split into the table's rows."""
    L, d, V, E = MODEL["num_hidden_layers"], MODEL["hidden_size"], MODEL["vocab_size"], PPO_EPOCHS
    dense = sum(2 * trunk * (p + r) for p, r in episodes)
    attention = forward_flops([p + r for p, r in episodes], trunk, L, d) - dense
    head = sum(2 * V * d * r for _, r in episodes)
    rows = {"sampling": dense + attention + head, "scoring": 3 * (dense + attention) + head,
            "PPO: trunk matmuls": 6 * E * dense, "PPO: lm_head": 3 * E * head, "PPO: attention": 6 * E * attention}
    rows["PPO epochs"] = rows["PPO: trunk matmuls"] + rows["PPO: lm_head"] + rows["PPO: attention"]
    rows["whole update"] = rows["sampling"] + rows["scoring"] + rows["PPO epochs"]
    return rows


def report(run: dict, trunk: int, peak: float) -> dict:
    """Per row: seconds, useful and executed FLOPs, useful FLOP/s over the peak."""
    seconds, flops = collections.Counter(run["seconds"]), collections.Counter(run["flops"])
    ppo = [row for row in ROWS if row.startswith("PPO: ")]
    seconds["PPO epochs"], flops["PPO epochs"] = sum(seconds[r] for r in ppo), sum(flops[r] for r in ppo)
    phases = seconds["sampling"] + seconds["scoring"] + seconds["PPO epochs"]
    seconds["whole update"], seconds["outside phases"] = run["whole"], run["whole"] - phases
    flops["whole update"] = flops["sampling"] + flops["scoring"] + flops["PPO epochs"]
    useful = useful_flops(run["episodes"], trunk)
    return {row: [f"{seconds[row]:.2f}", f"{useful[row] / 1e9:.1f}" if row in useful else "",
                  f"{flops[row] / 1e9:.1f}" if flops[row] else "",
                  f"{100 * useful[row] / seconds[row] / peak:.0f}%" if row in useful and seconds[row] else ""]
            for row in ROWS}


def unprofiled(run: dict, row: str, trunk: int, peak: float) -> list[str]:
    """The unprofiled updates' wall time of a phase, and its useful FLOP/s of the peak: medians and ranges."""
    seconds = [wall["ppo" if row == "PPO epochs" else row] for wall in run["wall"]]
    fractions = [100 * useful_flops(episodes, trunk)[row] / s / peak
                 for s, episodes in zip(seconds, run["wall_episodes"], strict=True)]
    return [f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f})",
            f"{statistics.median(fractions):.0f}% ({min(fractions):.0f}-{max(fractions):.0f}%)"]


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    return "CPU flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}"
                                     for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=csv(), default=["toy", "spread"],
                        help=f"of {', '.join(DATASETS)} (default toy,spread)")
    parser.add_argument("--sides", type=csv(), default=list(SIDES), help=f"of {', '.join(SIDES)} (default all)")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # run_child passes it
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "FOLDER", "DATASET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        child(args.child[0], Path(args.child[1]), args.child[2])
        return
    unknown = set(args.dataset) - set(DATASETS) | set(args.sides) - set(SIDES)
    if unknown:
        parser.error(f"unknown names {sorted(unknown)}")
    print(f"$ python {shlex.join(sys.argv)}\n{machine_line()}\n{cpu_flags()}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for dataset in args.dataset:
            info = build(folder, dataset, UPDATES * BATCH)
            peaks = [matmul_peak(1, torch.float32)]
            runs = {side: run_child([__file__, "--child", side, str(folder), dataset], 1, folder / "child.log")
                    for side in SIDES if side in args.sides}
            peaks += [x for run in runs.values() for x in run["peaks"]]
            reports = {side: report(run, info["trunk"], max(peaks)) for side, run in runs.items()}
            spec = DATASETS[dataset]
            lengths = "; ".join(f"{SIDES[s]} {sum(p for p, _ in r['episodes'])} + {sum(x for _, x in r['episodes'])}"
                                for s, r in runs.items())
            print(f"**{dataset}**: one profiled update (after one warm-up) of {BATCH} episodes, prompts "
                  f"{spec['prompt'][0]}-{spec['prompt'][1]} tokens, response_length {spec['response_length']}; "
                  f"prompt + response tokens: {lengths}; 1 thread; fp32 matmul peak {max(peaks) / 1e9:.0f} "
                  f"GFLOP/s (the best of {len(peaks)} measurements, the lowest {min(peaks) / 1e9:.0f}); "
                  "columns per side: seconds, useful GFLOP, executed GFLOP, useful GFLOP/s of peak\n")
            header = ["phase"] + [f"{SIDES[s]} {c}" for s in runs for c in ("s", "useful GF", "exec GF", "of peak")]
            print(table(header, [[row] + [x for s in runs for x in reports[s][row]] for row in ROWS]) + "\n")
            rows = [[row] + [x for run in runs.values() for x in unprofiled(run, row, info['trunk'], max(peaks))]
                    for row in ("sampling", "scoring", "PPO epochs", "whole update")]
            print(f"The {UPDATES - 2} updates after it, unprofiled (wall clock; each its own episodes): seconds and "
                  "useful GFLOP/s of peak, median (range)\n")
            print(table(["phase"] + [f"{SIDES[s]} {c}" for s in runs for c in ("s", "of peak")], rows) + "\n")
            for side, run in runs.items():
                for row in ("PPO epochs, outside matmuls", "PPO: attention", "PPO: other"):
                    top = ", ".join(f"{name} {1000 * s:.0f}" for name, s in run["top"].get(row, []))
                    print(f"- {SIDES[side]}, top self-CPU ops (ms) in {row}: {top}")
            print(flush=True)


if __name__ == "__main__":
    main()
