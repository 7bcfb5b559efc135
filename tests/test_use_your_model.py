"""docs/use-your-model.md works as written: every Python snippet in it runs, in a folder holding the runs/ it names
(tiny models trained for two steps on the shipped task: runs/sft, runs/reward, runs/ppo as a policy folder, and
runs/ppo_lora as a LoRA adapter on runs/sft)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from minirlhf import reward, sft

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toytask"


def test_every_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quick = ["--max_steps=2", "--per_device_train_batch_size=4", "--disable_tqdm=true", "--save_strategy=no"]
    sft.main([str(ROOT / "configs/sft.toml"), f"--model_name_or_path={TOY / 'model'}", f"--dataset_name={TOY / 'sft'}",
              "--output_dir=runs/sft", *quick])
    sft.main([str(ROOT / "configs/sft.toml"), "--model_name_or_path=runs/sft", f"--dataset_name={TOY / 'sft'}",
              "--output_dir=runs/ppo_lora", "--use_peft=true", *quick])
    reward.main([str(ROOT / "configs/reward.toml"), f"--model_name_or_path={TOY / 'model'}",
                 f"--dataset_name={TOY / 'preference'}", "--output_dir=runs/reward", "--eval_strategy=no", *quick])
    shutil.copytree("runs/sft", "runs/ppo")  # a policy folder, as PPO saves it
    capsys.readouterr()

    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "use-your-model.md").read_text(), re.S)
    assert len(snippets) == 3
    for code in snippets:
        exec(compile(code, "docs/use-your-model.md", "exec"), {})
    scores = [json.loads(line.removeprefix("chosen, rejected: ")) for line in capsys.readouterr().out.splitlines()
              if line.startswith("chosen, rejected: ")]
    assert len(scores) == 2  # transformers' and minirlhf's, of the same pair by the same model
    assert scores[0] == pytest.approx(scores[1], rel=1e-5, abs=1e-6)
