"""What the documents claim about the shipped task, rechecked by running it: the README's pipeline (SFT, then the
reward model, then PPO) as a user types it, one thread each. Exact digits are not the claim (float sums differ between
AVX2 and AVX-512 machines, and with the thread count); these bounds are, and a change that breaks one must update
the README's tables with it.

- reward model (README, "Reward-model training"): eval accuracy >= 0.9 by step 50 and >= 0.99 at the end, eval loss
  <= 0.05 at the end;
- PPO (README, "The offline pipeline"): the SFT policy's gold score starts near the task's 0.3, then the reward
  model's score and the gold score rise together, gold >= 0.95 by update 25, the KL to the SFT policy grows and the
  policy ratio stays within 0.05 of 1;
- the pipeline run again, command by command, does nothing and exits 0 (the reward model under torchrun, as the
  README's first command).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(trainer: str, *flags: str, torchrun: bool = False) -> list[dict]:
    """`python -m minirlhf.<trainer> configs/<trainer>.toml [flags]` (or under `torchrun`) from the repository root;
    its metrics.jsonl, and the same command run a second time must say there is nothing to do and exit 0."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [
        sys.executable]
    cmd = [*launcher, "-m", f"minirlhf.{trainer}", f"configs/{trainer}.toml", "--disable_tqdm=true", *flags]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    output_dir = next(f.split("=", 1)[1] for f in flags if f.startswith("--output_dir="))
    metrics = (Path(output_dir) / "metrics.jsonl").read_text()
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    assert (Path(output_dir) / "metrics.jsonl").read_text() == metrics
    return [json.loads(line) for line in metrics.splitlines()]


@pytest.mark.slow
def test_the_pipeline_does_what_the_readme_says(tmp_path):
    sft, reward = tmp_path / "sft", tmp_path / "reward"
    run("sft", f"--output_dir={sft}")

    evals = {r["step"]: r for r in run("reward", f"--output_dir={reward}", torchrun=True) if "eval_loss" in r}
    last = evals[max(evals)]
    assert evals[50]["eval_accuracy"] >= 0.9 and last["eval_accuracy"] >= 0.99 and last["eval_loss"] <= 0.05, evals

    updates = run("ppo", f"--output_dir={tmp_path / 'ppo'}", f"--sft_model_path={sft}", f"--reward_model_path={reward}",
                  "--total_episodes=800")  # 25 updates of 32 episodes
    assert [u["step"] for u in updates] == list(range(1, 26))
    gold, scores = [u["objective/gold_score"] for u in updates], [u["objective/scores"] for u in updates]
    kl, ratio = [u["objective/kl"] for u in updates], [u["val/ratio"] for u in updates]
    assert 0.2 <= gold[0] <= 0.45 and max(gold[-5:]) >= 0.95, gold
    assert min(scores[-5:]) > scores[0] + 5, scores
    assert min(kl[-5:]) > kl[0] + 1, kl
    assert all(abs(r - 1) < 0.05 for r in ratio), ratio
