"""Reward-model training end to end: step-for-step parity with TRL 1.12's RewardTrainer, resume, torchrun, the CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from reward_fixtures import write_model, write_pairs
from safetensors.torch import load_file

from minirlhf import reward

# Every setting the trajectory test exercises: decay, warmup, linear schedule, accumulation with a short last group
# (26 pairs / 4 = 7 micro-batches = 4 steps per epoch), clipping, centring, margins, eval, 2 epochs.
SETTINGS = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=3e-3, weight_decay=0.1, warmup_steps=2, lr_scheduler_type="linear", max_grad_norm=0.5,
                center_rewards_coefficient=0.01, logging_steps=1, num_train_epochs=2, eval_strategy="steps",
                eval_steps=3, save_strategy="no", seed=11, max_length=12)
KEYS = ["loss", "grad_norm", "learning_rate", "num_tokens", "min_reward", "mean_reward", "max_reward", "accuracy",
        "margin", "epoch", "step"]
EVAL_KEYS = ["eval_loss", "eval_num_tokens", "eval_min_reward", "eval_mean_reward", "eval_max_reward",
             "eval_accuracy", "eval_margin", "epoch", "step"]


def cli_args(settings: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in settings.items()]


def run_trl(model_dir, data_dir, output_dir):
    import datasets
    from trl import RewardConfig, RewardTrainer

    files = {"train": str(data_dir / "train.jsonl"), "test": str(data_dir / "test.jsonl")}
    ds = datasets.load_dataset("json", data_files=files)
    args = RewardConfig(output_dir=str(output_dir), bf16=False, use_cpu=True, report_to="none",
                        disable_tqdm=True, **SETTINGS)
    trainer = RewardTrainer(model=str(model_dir), args=args, train_dataset=ds["train"], eval_dataset=ds["test"])
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer.state.log_history


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    write_pairs(tmp_path / "data" / "train.jsonl", 28, seed=1)  # 2 rows exceed max_length and are dropped
    write_pairs(tmp_path / "data" / "test.jsonl", 10, seed=2)
    return tmp_path / "data"


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_trajectory_equals_trl(family, tmp_path, data_dir):
    model_dir = write_model(tmp_path / "model", family)
    theirs_log = run_trl(model_dir, data_dir, tmp_path / "trl")
    reward.main([f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}",
                 f"--output_dir={tmp_path / 'ours'}", "--disable_tqdm=true", *cli_args(SETTINGS)])
    ours_log = read_metrics(tmp_path / "ours")

    theirs_train = [r for r in theirs_log if "loss" in r]
    ours_train = [r for r in ours_log if "loss" in r]
    assert len(ours_train) == len(theirs_train) == 8
    for ours, theirs in zip(ours_train, theirs_train, strict=True):
        assert set(ours) == set(theirs), (set(ours) ^ set(theirs))
        for key in KEYS:
            torch.testing.assert_close(float(ours[key]), float(theirs[key]), rtol=1e-4, atol=1e-6,
                                       msg=f"step {theirs['step']} {key}")
    theirs_eval = [r for r in theirs_log if "eval_loss" in r]
    ours_eval = [r for r in ours_log if "eval_loss" in r]
    assert [r["step"] for r in ours_eval] == [r["step"] for r in theirs_eval] == [3, 6, 8]
    for ours, theirs in zip(ours_eval, theirs_eval, strict=True):
        assert set(ours) == set(theirs), (set(ours) ^ set(theirs))
        for key in EVAL_KEYS:
            torch.testing.assert_close(float(ours[key]), float(theirs[key]), rtol=1e-4, atol=1e-6,
                                       msg=f"eval step {theirs['step']} {key}")
    ours_final, theirs_final = ours_log[-1], theirs_log[-1]
    assert set(theirs_final) - set(ours_final) == {"total_flos"}  # we count no FLOPs
    torch.testing.assert_close(ours_final["train_loss"], theirs_final["train_loss"], rtol=1e-4, atol=1e-6)

    ours_weights = load_file(tmp_path / "ours" / "model.safetensors")
    theirs_weights = load_file(tmp_path / "trl" / "model.safetensors")
    assert set(ours_weights) == set(theirs_weights)
    # 1e-4 (the bound): the key bias gets an exactly-zero gradient in theory (softmax ignores a constant
    # added to every score), so Adam turns float noise of ~1e-9 into updates of ~lr and NeoX's differ by ~3e-5.
    for name, theirs in theirs_weights.items():
        torch.testing.assert_close(ours_weights[name], theirs, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    theirs_config = json.loads((tmp_path / "trl" / "config.json").read_text())
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert ours_config["pad_token_id"] == theirs_config["pad_token_id"] == 1
    assert ours_config["architectures"] == theirs_config["architectures"]


def test_resume_is_bitwise_equal(tmp_path, data_dir):
    """10 steps, checkpoint, a new process resumes to 20: weights and metrics equal an uninterrupted run."""
    model_dir = write_model(tmp_path / "model")
    common = [f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}", "--disable_tqdm=true",
              "--per_device_train_batch_size=4", "--learning_rate=3e-3", "--logging_steps=1", "--max_steps=20",
              "--warmup_steps=3", "--seed=3", "--gradient_checkpointing=false"]
    reward.main([*common, f"--output_dir={tmp_path / 'full'}", "--save_strategy=no"])
    # The "interrupted" run is a 20-step run that saved at step 10; a new process resumes from that checkpoint.
    reward.main([*common, f"--output_dir={tmp_path / 'run'}", "--save_steps=10"])
    checkpoint = tmp_path / "run" / "checkpoint-10"
    first_half = read_metrics(tmp_path / "run")[:10]
    subprocess.run([sys.executable, "-m", "minirlhf.reward", *common, f"--output_dir={tmp_path / 'resumed'}",
                    "--save_steps=10", f"--resume_from_checkpoint={checkpoint}"], check=True,
                   env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"})  # as conftest: bitwise
    full = read_metrics(tmp_path / "full")
    resumed = first_half + read_metrics(tmp_path / "resumed")
    for ours, theirs in zip(resumed[:-1], full[:-1], strict=True):
        assert ours == theirs
    full_weights = load_file(tmp_path / "full" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / "model.safetensors")
    for name, tensor in full_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name


def test_logs_start_anew_and_resume_without_repeats(tmp_path, data_dir):
    """A fresh run into an output_dir that has an older metrics.jsonl starts the log anew (it used to append, so plots
    joined two runs); a run resumed from checkpoint-4 after the interrupted one logged up to step 6 keeps steps 1-4
    and logs 5-8 once each."""
    model_dir = write_model(tmp_path / "model")
    common = [f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}", "--disable_tqdm=true",
              "--per_device_train_batch_size=4", "--logging_steps=1", "--gradient_checkpointing=false",
              f"--output_dir={tmp_path / 'out'}", "--save_steps=4"]
    reward.main([*common, "--max_steps=6"])
    reward.main([*common, "--max_steps=6", "--overwrite_output_dir=true"])
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1, 2, 3, 4, 5, 6, 6]  # 6 logs + the final record
    with open(tmp_path / "out" / "metrics.jsonl", "a") as f:
        f.write('{"loss": 0.5, "st')  # a record cut off by a crash
    reward.main([*common, "--max_steps=8", f"--resume_from_checkpoint={tmp_path / 'out' / 'checkpoint-4'}"])
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1, 2, 3, 4, 5, 6, 7, 8, 8]


def torchrun(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "minirlhf.reward", *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("fsdp", ["none", "full_shard", "shard_grad_op", "full_shard auto_wrap"])
def test_torchrun_two_ranks_equals_one_process_with_double_batch(tmp_path, data_dir, fsdp):
    """DDP, or FSDP2 with the whole model one unit or (auto_wrap) each block its own unit; evaluation on 3 batches of
    the 10 test pairs, so one rank has one batch fewer (under FSDP it runs a spare forward, since every forward
    gathers the weights from both ranks)."""
    model_dir = write_model(tmp_path / "model")
    common = [f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}", "--disable_tqdm=true",
              "--learning_rate=3e-3", "--logging_steps=1", "--max_steps=4", "--save_strategy=no",
              "--gradient_accumulation_steps=2", "--max_grad_norm=0.5", "--center_rewards_coefficient=0.01",
              "--eval_strategy=steps", "--eval_steps=2", "--per_device_eval_batch_size=4"]
    reward.main([*common, f"--output_dir={tmp_path / 'one'}", "--per_device_train_batch_size=4"])
    out = torchrun(*common, f"--output_dir={tmp_path / 'two'}", "--per_device_train_batch_size=2", f"--fsdp={fsdp}")
    assert (f"FSDP2 {fsdp}: rank 0 holds" in out) == (fsdp != "none")  # about half the parameters
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] and sum("eval_loss" in r for r in two) == 2
    for a, b in zip(one[:-1], two[:-1], strict=True):
        for key in KEYS if "loss" in a else ["eval_loss"]:  # other eval metrics are each rank's batch averages
            torch.testing.assert_close(float(b[key]), float(a[key]), rtol=1e-5, atol=1e-6, msg=key)
    one_w, two_w = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(one_w) == set(two_w)
    for name, tensor in one_w.items():
        torch.testing.assert_close(two_w[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_fsdp_resume_is_bitwise_equal(tmp_path, data_dir):
    """FSDP2 over two ranks saves whole weights and AdamW moments; a run restarted from checkpoint-2 alone ends with
    the uninterrupted run's weights, bit for bit."""
    model_dir = write_model(tmp_path / "model")
    common = [f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}", "--disable_tqdm=true",
              "--learning_rate=3e-3", "--logging_steps=1", "--max_steps=4", "--save_steps=2", "--fsdp=full_shard",
              "--per_device_train_batch_size=2", "--weight_decay=0.1"]
    torchrun(*common, f"--output_dir={tmp_path / 'full'}")
    optimizer_state = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    moments = optimizer_state["state"][0]["exp_avg"]
    assert type(moments) is torch.Tensor and moments.shape == load_file(  # whole, not one rank's shard
        tmp_path / "full" / "checkpoint-2" / "model.safetensors")["model.embed_tokens.weight"].shape
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    torchrun(*common, f"--output_dir={tmp_path / 'resumed'}", "--resume_from_checkpoint=true")
    full_weights = load_file(tmp_path / "full" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / "model.safetensors")
    for name, tensor in full_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    assert read_metrics(tmp_path / "resumed")[:2] == read_metrics(tmp_path / "full")[2:4]


# ---- the command line: bad config and bad data exit with code 2 and one line naming the key, file or row


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "minirlhf.reward", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_cli_runs_and_saves(tmp_path, data_dir):
    model_dir = write_model(tmp_path / "model")
    result = run_cli(f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}",
                     f"--output_dir={tmp_path / 'out'}", "--max_steps=2", "--per_device_train_batch_size=4",
                     "--disable_tqdm=true")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.toml").exists()
    assert (tmp_path / "out" / "checkpoint-2" / "optimizer.pt").exists()


def test_cli_eval_only(tmp_path, data_dir):
    """`--do_train false` into the output_dir of a finished run: the run's last eval record again (the same weights),
    in eval_results.json alone, the run's files untouched; a data file has no test split: one line, exit 2."""
    model_dir, out = write_model(tmp_path / "model"), tmp_path / "out"
    common = [f"--dataset_name={data_dir}", f"--output_dir={out}", "--per_device_eval_batch_size=4",
              "--disable_tqdm=true"]
    result = run_cli(f"--model_name_or_path={model_dir}", *common, "--max_steps=2", "--per_device_train_batch_size=4",
                     "--eval_strategy=steps", "--eval_steps=2", "--learning_rate=3e-3")
    assert result.returncode == 0, result.stderr
    trained = read_metrics(out)[-2]  # the eval at the last step, before the closing train_* record
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_cli(f"--model_name_or_path={out}", *common, "--do_train=false")
    assert result.returncode == 0, result.stderr
    assert "eval_accuracy=" in result.stdout
    ours = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward", "eval_min_reward", "eval_max_reward"):
        assert ours[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-6), key
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "eval_results.json"} == before

    result = run_cli(f"--model_name_or_path={out}", f"--dataset_name={data_dir / 'train.jsonl'}", "--do_train=false",
                     f"--output_dir={tmp_path / 'eval'}")
    assert result.returncode == 2 and not (tmp_path / "eval").exists()
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "'test' split" in result.stderr


def test_cli_unknown_key(tmp_path):
    (tmp_path / "bad.toml").write_text("learning_rte = 1e-5\n")
    result = run_cli(str(tmp_path / "bad.toml"))
    assert result.returncode == 2
    assert "learning_rte" in result.stderr and "learning_rate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_bad_value():
    result = run_cli("--per_device_train_batch_size=zero")
    assert result.returncode == 2 and "per_device_train_batch_size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_bad_data_row(tmp_path, data_dir):
    model_dir = write_model(tmp_path / "model")
    lines = (data_dir / "train.jsonl").read_text().splitlines()
    lines[5] = json.dumps({"prompt": "w1", "chosen": " w2"})  # no "rejected"
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}",
                     f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "train.jsonl line 6" in error[0] and "rejected" in error[0], error  # lines[5]


@pytest.mark.parametrize("fsdp, error", [
    ("full_shard", "error: fsdp: needs several processes: launch with torchrun --nproc_per_node=N, or leave fsdp "
                   "unset"),
    ("full_shard offload", "error: command line: fsdp: 'full_shard offload' is not one of ('full_shard', "
                           "'shard_grad_op'), optionally with 'auto_wrap' (no offload, no hybrid)"),
])
def test_cli_fsdp_errors(tmp_path, data_dir, fsdp, error):
    """FSDP outside torchrun, and FSDP options minirlhf does not implement: exit code 2, one line."""
    model_dir = write_model(tmp_path / "model")
    result = run_cli(f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}",
                     f"--output_dir={tmp_path / 'out'}", "--fsdp", fsdp)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [error], result.stderr
