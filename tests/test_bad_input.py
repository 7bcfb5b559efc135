"""The bad-input catalogue of issue 11: each bad config, file, model or checkpoint given to minirlhf.reward,
minirlhf.sft or minirlhf.ppo exits with code 2 and exactly one stderr line, `error: ...`, that names the key, file
or row, with no traceback, and leaves every file already there as it was (an earlier run's output_dir included).
The cases call `main([...])` in-process (a subprocess each would cost seconds); the CLI's own exit path is the same
`exit_on_bad_input`, checked in subprocesses in test_reward.py, test_sft.py and test_reliability.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reward_fixtures import write_model, write_pairs

from minirlhf import ppo, reward, sft
from minirlhf.infra.config import ConfigError, TrainingConfig, config_help, config_to_toml
from minirlhf.reward import RewardConfig

MAINS = {"reward": reward.main, "sft": sft.main, "ppo": ppo.main}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A model, preference pairs, SFT rows and prompts, and a finished reward run with a checkpoint (made once)."""
    root = tmp_path_factory.mktemp("base")
    write_model(root / "model")
    (root / "pairs").mkdir()
    write_pairs(root / "pairs" / "train.jsonl", 16, seed=1)
    rows = [json.loads(line) for line in (root / "pairs" / "train.jsonl").read_text().splitlines()]
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                                            for r in rows))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    reward.main([*reward_flags(root), f"--output_dir={root / 'reward_run'}", "--max_steps=2", "--save_steps=2"])
    sft.main([*sft_flags(root), f"--output_dir={root / 'sft_run'}", "--max_steps=1"])
    return root


def reward_flags(root: Path) -> list[str]:
    return [f"--model_name_or_path={root / 'model'}", f"--dataset_name={root / 'pairs'}", "--disable_tqdm=true",
            "--per_device_train_batch_size=4", "--gradient_checkpointing=false", "--max_steps=2"]


def sft_flags(root: Path) -> list[str]:
    return [f"--model_name_or_path={root / 'model'}", f"--dataset_name={root / 'sft.jsonl'}", "--disable_tqdm=true",
            "--per_device_train_batch_size=4", "--gradient_checkpointing=false", "--max_steps=2"]


def ppo_flags(root: Path) -> list[str]:
    return [f"--sft_model_path={root / 'model'}", f"--reward_model_path={root / 'model'}", "--disable_tqdm=true",
            f"--dataset_name={root / 'prompts.jsonl'}", "--per_device_train_batch_size=4", "--total_episodes=8",
            "--response_length=4", "--num_sample_generations=0", "--local_rollout_forward_batch_size=4"]


FLAGS = {"reward": reward_flags, "sft": sft_flags, "ppo": ppo_flags}


@pytest.fixture
def ws(base, tmp_path) -> Path:
    """A copy of `base` to damage, with an earlier run's log and config in out/ that a failed start must not touch."""
    shutil.copytree(base, tmp_path / "ws")
    (tmp_path / "ws" / "out").mkdir()
    (tmp_path / "ws" / "out" / "metrics.jsonl").write_text('{"loss": 1.0, "step": 1}\n')
    (tmp_path / "ws" / "out" / "config.toml").write_text("# an earlier run\n")
    return tmp_path / "ws"


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def fails(capsys, ws: Path, trainer: str, *extra: str, flags: list[str] | None = None) -> str:
    """Run `trainer` with its flags + extra into ws/out; assert exit 2, one stderr line, nothing touched."""
    before = snapshot(ws)
    capsys.readouterr()
    argv = [*(FLAGS[trainer](ws) if flags is None else flags), f"--output_dir={ws / 'out'}", *extra]
    with pytest.raises(SystemExit) as exit_info:
        MAINS[trainer](argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in err
    assert snapshot(ws) == before, "a failed start changed files"
    return lines[0]


# ---- config: keys, types, values (no file is read before these)


@pytest.mark.parametrize("trainer, extra, expected", [
    ("reward", ["--learning_rte=1e-5"], ["learning_rte", "did you mean 'learning_rate'"]),
    ("sft", ["--per_device_train_batch_size=two"], ["per_device_train_batch_size", "expected int"]),
    ("ppo", ["--num_ppo_epochs=1.5"], ["num_ppo_epochs"]),
    ("reward", ["--per_device_train_batch_size=0"], ["per_device_train_batch_size", ">= 1"]),
    ("sft", ["--gradient_accumulation_steps=-1"], ["gradient_accumulation_steps"]),
    ("reward", ["--learning_rate=-1e-5"], ["learning_rate", ">= 0"]),
    ("sft", ["--learning_rate=nan"], ["learning_rate", "nan"]),
    ("ppo", ["--learning_rate=inf"], ["learning_rate", "inf"]),
    ("reward", ["--adam_beta2=1.5"], ["adam_beta2"]),
    ("reward", ["--num_train_epochs=0", "--max_steps=-1"], ["num_train_epochs", "> 0"]),
    ("reward", ["--save_total_limit=0"], ["save_total_limit"]),
    ("reward", ["--on_nonfinite=ignore"], ["on_nonfinite", "'ignore'"]),
    ("ppo", ["--max_steps=10"], ["max_steps", "total_episodes", "leave it unset"]),
    ("reward", ["--trust_remote_code=true"], ["trust_remote_code", "not implemented"]),
    ("ppo", ["--num_mini_batches=3"], ["num_mini_batches", "not a multiple"]),
    ("ppo", ["--batch_size=2"], ["batch_size", "filled at runtime"]),
    ("ppo", ["--do_train=false"], ["do_train", "no evaluation loop", "leave it unset"]),
    ("ppo", ["--response_length=0"], ["response_length", ">= 1"]),
])
def test_bad_config_values(capsys, ws, trainer, extra, expected):
    line = fails(capsys, ws, trainer, *extra)
    assert all(e in line for e in expected), line


@pytest.mark.parametrize("text, expected", [
    ("learning_rate = 1e-5\nlearning_rate = 2e-5\n", ["invalid TOML", "line 2"]),  # a key given twice
    ("learning_rate = \n", ["invalid TOML", "line 1"]),
    ("seed = 1\nmax_lenght = 12\n", ["max_lenght", "did you mean 'max_length'"]),
])
def test_bad_toml(capsys, ws, text, expected):
    (ws / "bad.toml").write_text(text)
    line = fails(capsys, ws, "reward", flags=[str(ws / "bad.toml"), *reward_flags(ws)])
    assert str(ws / "bad.toml") in line and all(e in line for e in expected), line


# ---- data files


def test_missing_dataset(capsys, ws):
    assert "no such file" in fails(capsys, ws, "reward", f"--dataset_name={ws / 'nope.jsonl'}")


def test_empty_dataset(capsys, ws):
    (ws / "sft.jsonl").write_text("")
    assert "sft.jsonl: 0 training examples" in fails(capsys, ws, "sft")


def test_non_string_text(capsys, ws):
    path = ws / "pairs" / "train.jsonl"
    rows = path.read_text().splitlines()
    rows[3] = json.dumps({"prompt": "w1", "chosen": 5, "rejected": " w2", "margin": 0.1})
    path.write_text("\n".join(rows) + "\n")
    line = fails(capsys, ws, "reward")
    assert "train.jsonl line 4" in line and "'chosen'" in line, line  # rows[3]: the file's 4th line


def test_empty_text(capsys, ws):
    (ws / "prompts.jsonl").write_text('{"prompt": "w1"}\n{"prompt": ""}\n')
    line = fails(capsys, ws, "ppo")
    assert "line 2" in line and "'prompt'" in line, line


def test_missing_column(capsys, ws):
    (ws / "sft.jsonl").write_text('{"prompt": "w1", "completion": " w2"}\n{"prompt": "w1"}\n')
    line = fails(capsys, ws, "sft")
    assert "line 2" in line and "'completion'" in line, line


def test_invalid_json_line(capsys, ws):
    lines = (ws / "sft.jsonl").read_text().splitlines()
    lines[6] = '{"prompt": "w1", "completion": '
    (ws / "sft.jsonl").write_text("\n".join(lines) + "\n")
    line = fails(capsys, ws, "sft")
    assert "sft.jsonl" in line and "line 7" in line and "invalid JSON" in line, line


def test_non_utf8_bytes(capsys, ws):
    (ws / "prompts.jsonl").write_bytes(b'{"prompt": "w1"}\n{"prompt": "w\xff2"}\n')
    line = fails(capsys, ws, "ppo")
    assert "prompts.jsonl" in line and "UTF-8" in line, line


def test_every_row_longer_than_max_length(capsys, ws):
    line = fails(capsys, ws, "reward", "--max_length=2")
    assert "max_length" in line, line


def test_eos_token_not_in_vocabulary(capsys, ws):
    line = fails(capsys, ws, "reward", "--eos_token=<|nope|>")
    assert "<|nope|>" in line and "vocabulary" in line, line


# ---- model folders


def test_tokenizer_json_missing(capsys, ws):
    (ws / "model" / "tokenizer.json").unlink()
    assert "no tokenizer.json" in fails(capsys, ws, "sft")


def test_truncated_safetensors(capsys, ws):
    weights = ws / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = fails(capsys, ws, "reward")
    assert "model.safetensors" in line and "cannot read" in line, line


def test_unsupported_model_type(capsys, ws):
    config = json.loads((ws / "model" / "config.json").read_text())
    (ws / "model" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    assert "unsupported model_type 'bert'" in fails(capsys, ws, "sft")


def test_shape_mismatch(capsys, ws):
    config = json.loads((ws / "model" / "config.json").read_text())
    (ws / "model" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    line = fails(capsys, ws, "reward")
    assert "has shape" in line and "mlp" in line, line


def test_missing_tensor(capsys, ws):
    config = json.loads((ws / "model" / "config.json").read_text())
    (ws / "model" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    line = fails(capsys, ws, "sft")
    assert "layers.2" in line and "missing" in line, line


def test_weightless_folder_refused_for_ppo(capsys, ws):
    """A model folder whose weights are gone (a half-written save) is no random reward model for PPO."""
    (ws / "model" / "model.safetensors").unlink()
    line = fails(capsys, ws, "ppo")
    assert "no weights" in line and str(ws / "model") in line, line


def test_mismatched_vocabularies(capsys, ws):
    shutil.copytree(ws / "model", ws / "other")
    config = json.loads((ws / "other" / "config.json").read_text())
    write_model(ws / "other")  # same tokenizer, but a larger embedding below
    import transformers

    transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{**config, "vocab_size": config["vocab_size"] + 8})).save_pretrained(ws / "other")
    line = fails(capsys, ws, "ppo", f"--reward_model_path={ws / 'other'}")
    assert "vocabulary" in line and "reward_model_path" in line, line


def test_prompt_and_response_longer_than_positions(capsys, ws):
    """GPT-2's learned positions end at n_positions: refused before the first rollout, not an IndexError in it."""
    import transformers

    config = json.loads((ws / "model" / "config.json").read_text())
    gpt2 = transformers.GPT2Config(vocab_size=config["vocab_size"], n_embd=32, n_layer=1, n_head=4, n_positions=8,
                                   eos_token_id=0, bos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(gpt2).save_pretrained(ws / "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ws / "model" / name, ws / "gpt2" / name)
    line = fails(capsys, ws, "ppo", f"--sft_model_path={ws / 'gpt2'}", f"--reward_model_path={ws / 'gpt2'}",
                 "--response_length=6")
    assert "response_length" in line and "8 positions" in line, line


# ---- output_dir and checkpoints


def test_output_dir_is_a_file(capsys, ws):
    (ws / "file").write_text("x")
    flags = [*reward_flags(ws), f"--output_dir={ws / 'file'}"]
    before = snapshot(ws)
    with pytest.raises(SystemExit) as exit_info:
        reward.main(flags)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and line.startswith("error: output_dir: cannot write") and snapshot(ws) == before


def test_output_dir_not_writable(capsys, ws):
    target = ws / "locked"
    target.mkdir()
    target.chmod(0o500)
    try:
        if os.access(target, os.W_OK):  # root ignores the mode bits
            target, = [Path("/proc/minirlhf-cannot-write-here")]
        with pytest.raises(SystemExit) as exit_info:
            reward.main([*reward_flags(ws), f"--output_dir={target}"])
    finally:
        (ws / "locked").chmod(0o700)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and line.startswith("error: output_dir: cannot write"), line


def test_output_dir_with_a_finished_run(capsys, ws):
    shutil.rmtree(ws / "out")
    shutil.copytree(ws / "reward_run", ws / "out")
    line = fails(capsys, ws, "reward")
    assert "holds a finished run with a different config (keys: " in line and "model_name_or_path" in line
    assert "resume_from_checkpoint" in line and "overwrite_output_dir" in line


def test_corrupt_optimizer_state(capsys, ws):
    (ws / "reward_run" / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")
    line = fails(capsys, ws, "reward", f"--resume_from_checkpoint={ws / 'reward_run' / 'checkpoint-2'}")
    assert "optimizer.pt" in line and "cannot restore" in line, line


def test_corrupt_trainer_state(capsys, ws):
    (ws / "reward_run" / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2, ')
    line = fails(capsys, ws, "reward", f"--resume_from_checkpoint={ws / 'reward_run' / 'checkpoint-2'}")
    assert "trainer_state.json" in line and "cannot read" in line, line


def test_resume_from_a_non_checkpoint_folder(capsys, ws):
    line = fails(capsys, ws, "reward", f"--resume_from_checkpoint={ws / 'model'}")
    assert "not a minirlhf checkpoint" in line, line


def test_resume_true_without_checkpoints(capsys, ws):
    assert "no checkpoint-<step> folder" in fails(capsys, ws, "reward", "--resume_from_checkpoint=true")


def test_resume_from_another_trainers_checkpoint(capsys, ws):
    checkpoint = next((ws / "sft_run").glob("checkpoint-*"))
    line = fails(capsys, ws, "reward", f"--resume_from_checkpoint={checkpoint}")
    assert "minirlhf.sft checkpoint, not a minirlhf.reward one" in line, line


def test_checkpoint_without_weights(capsys, ws):
    (ws / "reward_run" / "checkpoint-2" / "model.safetensors").unlink()
    line = fails(capsys, ws, "reward", f"--resume_from_checkpoint={ws / 'reward_run' / 'checkpoint-2'}")
    assert "no weights" in line and "checkpoint-2" in line, line


def test_full_disk_during_a_save(capsys, ws, tmp_path):
    """A 200 KiB tmpfs as output_dir: the checkpoint does not fit; one line, and nothing half-written is left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    try:
        with pytest.raises(SystemExit) as exit_info:
            reward.main([*reward_flags(ws), f"--output_dir={disk}", "--save_steps=1"])
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and "No space left on device" in line and "checkpoint-1" in line, line
        assert not any(p.name.startswith(".tmp") for p in disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)  # -l: the in-process run left its log open


# ---- what the user reads


def test_help_and_config_name_the_module():
    """`--help` and config.toml say minirlhf.reward, also when run as `python -m` (it was "__main__")."""
    result = subprocess.run([sys.executable, "-m", "minirlhf.reward", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m minirlhf.reward "), result.stdout[:200]
    assert config_help(RewardConfig).startswith("usage: python -m minirlhf.reward ")
    assert config_to_toml(RewardConfig()).startswith("# minirlhf.reward.RewardConfig as resolved")


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainingConfig(learning_rate=float("nan"))


def test_resume_from_another_trainers_checkpoint_saved_before_the_trainer_field(capsys, ws):
    """Without the trainer's name in trainer_state.json (older checkpoints), the shapes still tell: one line."""
    checkpoint = next((ws / "sft_run").glob("checkpoint-*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["trainer"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    line = fails(capsys, ws, "reward", f"--resume_from_checkpoint={checkpoint}")
    assert str(checkpoint) in line, line
