"""Issue 20, the newcomer's path without a stumble: what a first user types, run for real on the shipped toy task
(`python -m minirlhf.<trainer>` in a subprocess where the command line is the point; `main()` in-process where a
subprocess would only add seconds).

(a) A command re-run on its own finished run says so and exits 0 before loading anything, also with
    --resume_from_checkpoint=true; a changed config is refused before loading, naming the keys that changed; the
    advice names only what can work; a failed start leaves no folder behind.
(b) Evaluation never silently reads the training rows: a missing test split is refused (reward's eval), or said
    (PPO's sample completions then use the training prompts).
(c) The smaller stumbles: a LoRA run's merged/ tokenizer, TOML-only config files, row errors by file line, missing
    pipeline folders, TrainingArguments keys minirlhf leaves out, PPO's "update", plot.py's errors, list flags.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minirlhf import ppo, reward, sft
from minirlhf.infra.config import ConfigError, parse_config
from minirlhf.infra.files import load_rows, local_or_hub
from minirlhf.infra.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
REWARD = ["configs/reward.toml", "--max_steps=2", "--disable_tqdm=true"]  # the README's command, 2 steps
SFT = ["configs/sft.toml", "--max_steps=1", "--disable_tqdm=true"]


def cli(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=300)


def files(folder: Path) -> dict:
    """Every file under `folder` with its bytes and modification time: "untouched" means not even rewritten."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def exits(capsys, main, argv: list[str], code: int = 2) -> tuple[str, str]:
    """main(argv) in-process: the exit code, then (stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    return capsys.readouterr()


# ---- (a) a finished run, run again


def test_a_finished_run_run_again(tmp_path, monkeypatch):
    """`python -m minirlhf.reward configs/reward.toml` twice: the second says the run is finished and exits 0 at once,
    as does --resume_from_checkpoint=true (it used to append a second final record) and another disable_tqdm (it
    used to count as another config); a changed config is refused
    before the model is looked at (a missing model path is not what it reports), naming the keys that changed."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "reward"
    reward.main([*REWARD, f"--output_dir={out}"])
    before = files(out)
    # the progress bar shown or not changes nothing the run saved
    for extra in ([], ["--resume_from_checkpoint=true"], ["--disable_tqdm=false"]):
        again = cli("minirlhf.reward", *REWARD, f"--output_dir={out}", *extra)
        assert again.returncode == 0 and again.stderr == "", again.stderr[-2000:]
        assert again.stdout.splitlines() == [
            f"[minirlhf] {out} already holds this finished run (same config); nothing to do"]
        assert files(out) == before

    changed = cli("minirlhf.reward", *REWARD, f"--output_dir={out}", "--learning_rate=1e-4",
                  f"--model_name_or_path={tmp_path / 'nowhere'}")
    line = error_line(changed)
    assert line.startswith(f"error: output_dir: {out} holds a finished run with a different config (keys: "
                           "learning_rate, model_name_or_path)"), line
    assert "--resume_from_checkpoint=true" in line and "--overwrite_output_dir=true" in line, line
    assert changed.stdout == "" and files(out) == before


def test_refusal_advises_no_resume_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    """configs/sft.toml saves no checkpoint (save_strategy = "no"): refused, the advice is to overwrite or to choose
    another output_dir, never a resume that has nothing to resume from."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "sft"
    sft.main([*SFT, f"--output_dir={out}"])
    _, err = exits(capsys, sft.main, [*SFT, f"--output_dir={out}", "--learning_rate=1e-4"])
    assert err.startswith(f"error: output_dir: {out} holds a finished run with a different config (keys: "
                          "learning_rate)"), err
    assert "resume_from_checkpoint" not in err and "--overwrite_output_dir=true" in err, err
    assert err.endswith("or choose another output_dir\n"), err


def test_another_runs_checkpoints_are_called_so(tmp_path):
    from minirlhf.infra.run import check_output_dir

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2, "run_id": "theirs"}')
    with pytest.raises(ValueError, match=r"holds another run's checkpoints \(checkpoint-2\)"):
        check_output_dir(reward.RewardConfig(output_dir=str(tmp_path)), "ours")


def test_a_failed_start_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """output_dir is checked for writing without being created: a start that then fails leaves no empty folder."""
    monkeypatch.chdir(ROOT)
    _, err = exits(capsys, reward.main, [*REWARD, f"--output_dir={tmp_path / 'new' / 'run'}",
                                         f"--dataset_name={tmp_path / 'missing.jsonl'}"])
    assert "missing.jsonl: no such file or folder" in err and not (tmp_path / "new").exists()


# ---- (b) no evaluation on the training rows


def test_eval_on_a_single_file_is_refused(tmp_path):
    """A data file is the train split alone: evaluating on it would score the training rows (load_rows ignored the
    split for a file). TRL's script fails on the missing split too."""
    result = cli("minirlhf.reward", *REWARD, "--dataset_name=configs/toytask/preference/train.jsonl",
                 f"--output_dir={tmp_path / 'out'}")
    line = error_line(result)
    assert "configs/toytask/preference/train.jsonl" in line and "no 'test' split" in line, line
    assert 'eval_strategy = "no"' in line and "test.jsonl" in line, line
    assert not (tmp_path / "out").exists()


def test_eval_on_a_folder_without_a_test_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "configs" / "toytask" / "preference" / "train.jsonl", tmp_path / "data" / "train.jsonl")
    _, err = exits(capsys, reward.main, [*REWARD, f"--dataset_name={tmp_path / 'data'}",
                                         f"--output_dir={tmp_path / 'out'}"])
    assert "no data files for split 'test'" in err and 'eval_strategy = "no"' in err, err


def test_ppo_says_its_sample_completions_use_the_training_prompts(toy_model, tmp_path, capsys):
    """PPO's sample completions (num_sample_generations > 0, TRL's default 10) only show text: on a single prompt file
    they run on the training prompts, and say so."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "configs/toytask/prompts/train.jsonl").read_text().splitlines(True)[:8]))
    ppo.main(["--sft_model_path", str(toy_model), "--reward_model_path", str(toy_model), "--dataset_name", str(prompts),
              "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "8", "--num_ppo_epochs", "1",
              "--response_length", "4", "--total_episodes", "8", "--num_sample_generations", "1",
              "--per_device_eval_batch_size", "4", "--save_strategy", "no", "--gradient_checkpointing", "false"])
    assert f"[minirlhf] {prompts} has no 'test' split: sample completions use the training prompts" in \
        capsys.readouterr().out
    assert (tmp_path / "out" / "completions.jsonl").read_text()


# ---- (c) smaller stumbles


def test_lora_merged_folder_loads_with_its_tokenizer(tmp_path):
    """merged/ is a whole model: transformers loads its tokenizer there too (it used to blame sentencepiece). The
    list flag is written as TRL's HfArgumentParser takes it (nargs)."""
    import transformers

    out = tmp_path / "lora"
    result = cli("minirlhf.sft", *SFT, f"--output_dir={out}", "--use_peft", "--lora_target_modules", "q_proj", "v_proj")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (["q_proj", "v_proj"],
                                                                                        ["v_proj", "q_proj"])
    theirs = transformers.AutoTokenizer.from_pretrained(out / "merged")
    ours = Tokenizer.from_pretrained(out)
    assert theirs("tell me some fruits :")["input_ids"] == ours.encode("tell me some fruits :")


def test_yaml_config_says_toml_only(tmp_path):
    (tmp_path / "reward.yaml").write_text("learning_rate: 1.0e-5\noutput_dir: runs/x\n")
    line = error_line(cli("minirlhf.reward", str(tmp_path / "reward.yaml")))
    assert line == (f"error: {tmp_path / 'reward.yaml'}: minirlhf reads TOML config files only; convert it line by "
                    'line: `key: value` -> `key = value`, strings quoted (learning_rate: 1.0e-5 -> learning_rate = '
                    '1.0e-5, output_dir: runs/x -> output_dir = "runs/x")'), line
    for suffix in (".yml", ".json"):
        (tmp_path / f"c{suffix}").write_text("{}")
        with pytest.raises(ConfigError, match="TOML config files only"):
            parse_config(reward.RewardConfig, [str(tmp_path / f"c{suffix}")])


def test_row_errors_name_the_line_of_the_file(tmp_path, monkeypatch, capsys):
    """A JSON-lines file's line, counted from 1 as editors do, blank lines included; a JSON list's row from 1; a
    folder's file by name. They used to be row indices from 0, one less than the line (more with blank lines)."""
    tokenizer = Tokenizer.from_pretrained(ROOT / "configs" / "toytask" / "model")
    good = json.dumps({"prompt": "w1", "completion": " w2"})
    (tmp_path / "blank.jsonl").write_text(f"{good}\n\n{good}\n{json.dumps({'prompt': 'w1'})}\n")
    (tmp_path / "list.json").write_text(json.dumps([json.loads(good), {"prompt": "w1"}]))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text(f"{good}\n{json.dumps({'prompt': 'w1'})}\n")
    for name, where in (("blank.jsonl", "line 4"), ("list.json", "row 2"), ("folder", "train.jsonl line 2")):
        rows = load_rows(str(tmp_path / name), "train")
        with pytest.raises(ValueError, match=f"^src: {where}: missing column 'completion'"):
            sft.prepare_sft_dataset(rows, tokenizer, None, source="src")
    with pytest.raises(ValueError, match="^src: row 2: missing column"):  # rows not read from a file: from 1 too
        sft.prepare_sft_dataset([json.loads(good), {"prompt": "w1"}], tokenizer, None, source="src")
    monkeypatch.chdir(ROOT)
    _, err = exits(capsys, sft.main, [*SFT, f"--dataset_name={tmp_path / 'blank.jsonl'}",
                                      f"--output_dir={tmp_path / 'out'}"])
    assert err == f"error: {tmp_path / 'blank.jsonl'} [train]: line 4: missing column 'completion' (columns: " \
                  "['prompt'])\n", err


def test_missing_pipeline_folder_says_which_command_makes_it(tmp_path):
    """`python -m minirlhf.ppo configs/ppo.toml` before the SFT step: runs/sft is a folder the pipeline makes, not a
    Hub id to look up (it used to report the Hub's error)."""
    line = error_line(cli("minirlhf.ppo", str(ROOT / "configs" / "ppo.toml"), cwd=tmp_path))
    assert line == "error: runs/sft: no such file or folder; `python -m minirlhf.sft configs/sft.toml` makes it", line
    os.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match=r"^runs/reward: no such file or folder; `python -m minirlhf.reward "
                                             r"configs/reward.toml` makes it$"):
            local_or_hub("runs/reward", ["*.json"])
        (tmp_path / "mine").mkdir()  # a name whose first folder exists is a path, not a Hub id
        with pytest.raises(ValueError, match=r"^mine/model: no such file or folder$"):
            local_or_hub("mine/model", ["*.json"])
    finally:
        os.chdir(ROOT)


@pytest.mark.parametrize("key", ["deepspeed", "push_to_hub", "hub_model_id", "optim", "torch_compile"])
def test_trainingarguments_keys_left_out_are_named_so(key):
    """`--deepspeed` used to get "did you mean 'seed'?"; genuine typos keep their hint."""
    with pytest.raises(ConfigError) as e:
        parse_config(reward.RewardConfig, [f"--{key}", "x"])
    assert str(e.value).startswith(f"command line: {key}: a TrainingArguments key not implemented in minirlhf")
    assert "did you mean" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        parse_config(reward.RewardConfig, ["--learning_rte", "1e-5"])


def test_ppo_stop_line_says_update(toy_model, tmp_path, monkeypatch, capsys):
    """PPO counts updates, so does its stop line (it said "after step N")."""
    from minirlhf.infra.run import StopSignal

    monkeypatch.setattr(StopSignal, "requested", lambda self, device: True)  # as if SIGTERM came during update 1
    out, _ = exits(capsys, ppo.main, [
        "--sft_model_path", str(toy_model), "--reward_model_path", str(toy_model), "--output_dir", str(tmp_path),
        "--dataset_name", str(ROOT / "configs/toytask/prompts"), "--per_device_train_batch_size", "4",
        "--num_ppo_epochs", "1", "--response_length", "2", "--total_episodes", "8", "--num_sample_generations", "0",
        "--save_strategy", "no", "--gradient_checkpointing", "false"], code=143)
    assert f"[minirlhf] stopped by SIGTERM after update 1: saved {tmp_path / 'checkpoint-1'}" in out, out


def test_plot_errors_are_one_line(tmp_path):
    def plot(*args):
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), *args, "--out",
                               str(tmp_path / "x.png")], capture_output=True, text=True, timeout=60)

    missing = plot(str(tmp_path / "nope.jsonl"), "loss")
    assert missing.returncode == 1 and missing.stderr == (
        f"error: {tmp_path / 'nope.jsonl'}: cannot read (No such file or directory)\n"), missing.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"loss": 1, "step": 1}\n{"eval_loss": 2, "step": 1}\n')
    unknown = plot(str(tmp_path / "run" / "metrics.jsonl"), "eval_los")
    assert unknown.returncode == 1 and unknown.stderr == (
        "error: run: no record has the key 'eval_los'; its keys: eval_loss, loss, step\n"), unknown.stderr


@pytest.mark.parametrize("flags", [
    ["--lora_target_modules", "q_proj", "v_proj"],  # TRL's HfArgumentParser (nargs)
    ["--lora_target_modules", "q_proj,v_proj"],
    ["--lora_target_modules=q_proj,v_proj"],
    ["--lora_target_modules", '["q_proj", "v_proj"]'],  # a TOML array
    ["--lora_target_modules=['q_proj', 'v_proj']"],
])
def test_list_flags_as_trl_users_write_them(flags):
    cfg = parse_config(reward.RewardConfig, [*flags, "--seed", "3"])
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.seed == 3


def test_list_flag_values_are_typed():
    gold = "minirlhf.infra.toytask:gold_score"
    assert parse_config(ppo.PPOConfig, ["--metric_funcs", gold, gold]).metric_funcs == [gold, gold]
    for weights in (["-0.5"], ["[-0.5]"]):  # a negative number is a value, not a flag
        cfg = parse_config(ppo.PPOConfig, ["--reward_funcs", gold, "--reward_weights", *weights])
        assert cfg.reward_weights == [-0.5]
    with pytest.raises(ConfigError, match=r"^command line: lora_target_modules: expected list\[str\] \| None"):
        parse_config(reward.RewardConfig, ["--lora_target_modules", '["q_proj"'])
