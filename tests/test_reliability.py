"""Reliability, by doing the damage for real: signals to running training processes (one process and torchrun),
kill -9 during checkpoint and final-model writes, non-finite losses, and an output_dir that holds another run.
Each test can fail: it checks files, exit codes and weights, not our own messages alone."""

import json
import multiprocessing
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reward_fixtures import write_model, write_pairs
from safetensors.torch import load_file

from minirlhf import reward
from minirlhf.infra.checkpoint import checkpoint_dirs, load_checkpoint, read_state, resolve_resume
from minirlhf.infra.hf import load_pretrained, save_pretrained
from minirlhf.model import RewardModel
from minirlhf.optim import AdamW, param_groups

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def task(tmp_path) -> tuple[Path, list[str]]:
    """A tiny Llama and 32 preference pairs; flags for a reward run that logs every step."""
    (tmp_path / "data").mkdir()
    write_pairs(tmp_path / "data" / "train.jsonl", 32, seed=1)
    model = write_model(tmp_path / "model")
    flags = [f"--model_name_or_path={model}", f"--dataset_name={tmp_path / 'data'}", "--disable_tqdm=true",
             "--per_device_train_batch_size=4", "--learning_rate=3e-3", "--logging_steps=1", "--seed=3",
             "--gradient_checkpointing=false"]
    return tmp_path, flags


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def start_and_wait_for_step(cmd: list[str], step: int = 3, **popen) -> subprocess.Popen:
    """Start a training process and return once it has logged optimizer step `step` (training is under way); the
    lines read until then are in proc.seen."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, **popen)
    proc.seen = []
    for line in proc.stdout:
        proc.seen.append(line)
        if f"step={step}" in line.split():
            return proc
    proc.wait()
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")


def assert_same_weights(a: Path, b: Path) -> None:
    ours, theirs = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


# ---- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_resume_is_bitwise_equal(task, signum):
    """SIGTERM/SIGINT mid-run: the step finishes, checkpoint-<step> is written, one line says where, exit 128 + signal
    with no traceback; resuming from it ends with the uninterrupted run's weights and metrics, bit for bit."""
    tmp_path, flags = task
    flags = [*flags, "--max_steps=400", "--save_strategy=no"]  # no checkpoint unless the signal asks for one
    proc = start_and_wait_for_step([sys.executable, "-m", "minirlhf.reward", *flags,
                                    f"--output_dir={tmp_path / 'run'}"])
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped = [line for line in out.splitlines() if "stopped by" in line]
    assert len(stopped) == 1, out[-2000:]
    checkpoints = checkpoint_dirs(tmp_path / "run")
    assert len(checkpoints) == 1 and str(checkpoints[0]) in stopped[0]
    step = read_state(checkpoints[0])["step"]
    assert 3 <= step < 400

    reward.main([*flags, f"--output_dir={tmp_path / 'run'}", "--resume_from_checkpoint=true"])
    reward.main([*flags, f"--output_dir={tmp_path / 'full'}"])
    assert_same_weights(tmp_path / "run", tmp_path / "full")
    resumed, full = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "full")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for ours, theirs in zip(resumed[:-1], full[:-1], strict=True):  # the last record holds the wall-clock runtime
        assert ours == theirs


def sft_and_ppo_flags(tmp_path: Path) -> dict[str, list[str]]:
    """Flags for an SFT run and a PPO run on the task's model (as the policy and the reward model) and prompts."""
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                                                for r in rows))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    common = ["--disable_tqdm=true", "--per_device_train_batch_size=4", "--seed=3", "--gradient_checkpointing=false",
              "--save_strategy=no"]
    return {"sft": [*common, f"--model_name_or_path={tmp_path / 'model'}", f"--dataset_name={tmp_path / 'sft.jsonl'}",
                    "--logging_steps=1", "--learning_rate=1e-3", "--max_steps=300"],
            "ppo": [*common, f"--sft_model_path={tmp_path / 'model'}", f"--reward_model_path={tmp_path / 'model'}",
                    f"--dataset_name={tmp_path / 'prompts.jsonl'}", "--total_episodes=160", "--response_length=4",
                    "--num_sample_generations=0", "--num_ppo_epochs=1", "--learning_rate=1e-3"]}


@pytest.mark.parametrize("trainer", ["sft", "ppo"])
def test_signal_and_resume_in_sft_and_ppo(task, trainer, capsys):
    """The same contract in minirlhf.sft and minirlhf.ppo: SIGTERM mid-run, checkpoint, exit 143, and the resumed
    run ends bit for bit where the uninterrupted one does (PPO: policy and value model)."""
    from minirlhf import ppo, sft

    tmp_path, _ = task
    flags = sft_and_ppo_flags(tmp_path)[trainer]
    proc = start_and_wait_for_step([sys.executable, "-m", f"minirlhf.{trainer}", *flags,
                                    f"--output_dir={tmp_path / 'run'}"], step=2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by SIGTERM" in out, err[-2000:]
    main = {"sft": sft.main, "ppo": ppo.main}[trainer]
    capsys.readouterr()
    main([*flags, f"--output_dir={tmp_path / 'run'}", "--resume_from_checkpoint=true"])
    assert "resumed from" in capsys.readouterr().out
    main([*flags, f"--output_dir={tmp_path / 'full'}"])
    for sub in ["", "value_model"] if trainer == "ppo" else [""]:
        assert_same_weights(tmp_path / "run" / sub, tmp_path / "full" / sub)
    resumed, full = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "full")
    drop = {"eps", "train_runtime", "train_samples_per_second", "train_steps_per_second"}  # wall-clock rates

    def kept(records: list[dict]) -> list[str]:  # JSON text: a nan (one cell's val/ratio_var) equals itself
        return [json.dumps({k: v for k, v in r.items() if k not in drop and not k.startswith("time/")})
                for r in records]

    assert kept(resumed) == kept(full)


def test_signal_while_loading_exits_at_once(task):
    """A signal before the loop (while models and data load): one line, exit 130, no KeyboardInterrupt traceback."""
    tmp_path, flags = task
    proc = subprocess.Popen([sys.executable, "-m", "minirlhf.reward", *flags, f"--output_dir={tmp_path / 'run'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    for line in proc.stdout:
        if "bf16 not set" in line:  # printed by training.start, before anything loads
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "[minirlhf] SIGINT: exiting at once; checkpoints already written are complete"], err[-2000:]


def test_ctrl_c_while_importing_prints_no_traceback(task):
    """SIGINT while `python -m minirlhf.reward` is still importing torch (its libraries just mapped, long before
    training.start): one line, exit 130, no KeyboardInterrupt traceback, nothing written."""
    tmp_path, flags = task
    proc = subprocess.Popen([sys.executable, "-m", "minirlhf.reward", *flags, f"--output_dir={tmp_path / 'run'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "[minirlhf] SIGINT while starting: exiting at once"], err[-2000:]
    assert not (tmp_path / "run").exists()


def test_ppo_nonfinite_loss_stops(task, capsys):
    """PPO with a learning rate that blows the weights up to inf: exit 1 at the first update whose losses or
    weights are nan/inf, before that update's checkpoint."""
    from minirlhf import ppo

    tmp_path, _ = task
    flags = sft_and_ppo_flags(tmp_path)["ppo"]
    with pytest.raises(SystemExit) as exit_info:
        ppo.main([*flags, "--learning_rate=1e37", "--save_steps=1", f"--output_dir={tmp_path / 'run'}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and line.startswith("error: step ") and "weights = " in line, line
    assert "on_nonfinite" not in line  # the weights blew up in steps already taken: "skip" cannot help, not offered
    bad = int(line.split()[2].rstrip(":"))
    assert [int(p.name.split("-")[1]) for p in checkpoint_dirs(tmp_path / "run")] == list(range(1, bad))


REWARD_CALLS = []


def nan_at_update_2(prompts: list[str], completions: list[str]) -> list[float]:
    """A PPO reward function: nan for the second update's rollouts, whose losses and gradients are then nan in every
    minibatch, 0 for the others."""
    REWARD_CALLS.append(len(prompts))
    return [float("nan") if len(REWARD_CALLS) == 2 else 0.0] * len(prompts)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # clip_grad_norm_'s norm, or that of unclipped gradients
def test_ppo_nonfinite_loss_skip_drops_the_step(task, capsys, max_grad_norm):
    """PPO with on_nonfinite = "skip": update 2's optimizer step is not taken (the policy, the value model and
    AdamW's moments and step counts in checkpoint-2 are those of checkpoint-1), it is counted in skipped_steps from
    then on, also by a run resumed after it, and training goes on."""
    from minirlhf import ppo

    tmp_path, _ = task
    REWARD_CALLS.clear()
    out = tmp_path / "run"
    flags = [*sft_and_ppo_flags(tmp_path)["ppo"], "--total_episodes=16", "--save_strategy=steps", "--save_steps=1",
             "--on_nonfinite=skip", f"--max_grad_norm={max_grad_norm}",
             "--reward_funcs=test_reliability:nan_at_update_2"]
    ppo.main([*flags, f"--output_dir={out}"])
    assert "step 2 (PPO epoch 1, minibatch 1): pg_loss = nan" in capsys.readouterr().out
    assert [m.get("skipped_steps") for m in read_metrics(out)] == [None, 1, 1, 1]
    ppo.main([*flags, f"--output_dir={out}", f"--resume_from_checkpoint={out / 'checkpoint-3'}"])  # update 4 again
    assert [m.get("skipped_steps") for m in read_metrics(out)] == [None, 1, 1, 1]
    for sub in ("", "value_model"):
        assert_same_weights(out / "checkpoint-2" / sub, out / "checkpoint-1" / sub)
    before, after = (torch.load(out / f"checkpoint-{i}" / "optimizer.pt", weights_only=True)["state"] for i in (1, 2))
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # every moment and step count, exactly
    trained = load_file(out / "checkpoint-3" / "model.safetensors")
    skipped = load_file(out / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(trained[k], skipped[k]) for k in skipped)  # update 3 steps again
    assert all(torch.isfinite(t).all() for t in trained.values())


def test_ppo_nonfinite_loss_stops_before_its_step(task, capsys):
    """PPO with on_nonfinite = "stop" and update 2's rollouts scored nan: exit 1 before its first optimizer step, one
    line naming the update, the minibatch and the quantities, suggesting "skip"; checkpoint-1 is the last."""
    from minirlhf import ppo

    tmp_path, _ = task
    REWARD_CALLS.clear()
    with pytest.raises(SystemExit) as exit_info:
        ppo.main([*sft_and_ppo_flags(tmp_path)["ppo"], "--total_episodes=16", "--save_strategy=steps",
                  "--save_steps=1", "--reward_funcs=test_reliability:nan_at_update_2",
                  f"--output_dir={tmp_path / 'run'}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1, line
    assert line.startswith("error: step 2 (PPO epoch 1, minibatch 1): pg_loss = nan"), line
    assert "last checkpoint: " in line and line.endswith('or set on_nonfinite = "skip"'), line
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["checkpoint-1"]


def test_missing_rng_state_is_said(task, capsys):
    tmp_path, flags = task
    reward.main([*flags, "--max_steps=4", "--save_steps=2", f"--output_dir={tmp_path / 'run'}"])
    (tmp_path / "run" / "checkpoint-2" / "rng_state_0.pth").unlink()
    capsys.readouterr()
    reward.main([*flags, "--max_steps=4", "--save_steps=2", f"--output_dir={tmp_path / 'run'}",
                 f"--resume_from_checkpoint={tmp_path / 'run' / 'checkpoint-2'}"])
    out = capsys.readouterr().out
    assert "rng_state_0.pth is missing" in out and "resumed from" in out


# A disk the test holds: once a checkpoint's temporary folder and random state are written, its model files wait
# until the test lets them through (a file named after the folder appears in the gate folder, argv[1]); each save
# first says so on stdout. Signals then land mid-save at points the test knows, not after guessed sleeps. A wait
# gives up after 30 s and writes (a test that stops releasing ends with a wrong outcome, not a hung process).
HELD_DISK = """import sys, time
from pathlib import Path
import minirlhf.infra.checkpoint as checkpoint
from minirlhf import reward
gates, real = Path(sys.argv[1]), checkpoint.save_pretrained
def held(model, folder, *args, **kwargs):
    name = Path(folder).name
    print(f"[held disk] writing {name}", flush=True)
    deadline = time.monotonic() + 30
    while not (gates / name).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    real(model, folder, *args, **kwargs)
checkpoint.save_pretrained = held
reward.main(sys.argv[2:])
"""


def test_second_signal_exits_at_once_and_keeps_the_last_checkpoint(task):
    """A save every step, each held mid-write until the test releases it. SIGTERM while checkpoint-2 is held, and
    again as soon as the first has been handled (as torchrun forwards it: the same request, the run goes on: it
    finishes checkpoint-2, takes step 3 and starts the stop's save); then, more than 1 s after the first and while
    the stop's save (checkpoint-3) is held half-written, SIGTERM again: exit at once (143) with one line, no "stopped"
    line, and the newest complete checkpoint, checkpoint-2, loads (the half-written one is ignored, then cleared by
    the next save)."""
    tmp_path, flags = task
    gates, out = tmp_path / "gates", tmp_path / "run"
    gates.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HELD_DISK, str(gates), *flags, "--max_steps=2000", "--save_steps=1",
                             "--save_total_limit=2", f"--output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    seen = []

    def read_until(text: str) -> str:
        """The child's stdout up to the first line holding `text` (that line, stripped)."""
        for line in proc.stdout:
            seen.append(line)
            if text in line:
                return line.strip()
        proc.wait()
        raise AssertionError(f"the run ended before {text!r}: {proc.stderr.read()[-2000:]}")

    try:
        assert read_until("[held disk] writing") == "[held disk] writing .tmp-checkpoint-1"
        (gates / ".tmp-checkpoint-1").touch()
        # held: training is under way, and the child waits in a loop where a signal's handler runs at once
        assert read_until("[held disk] writing") == "[held disk] writing .tmp-checkpoint-2"
        proc.send_signal(signal.SIGTERM)
        read_until("finishing this step")  # printed by the handler: the first signal has been taken
        first = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # as torchrun forwards it: the same request, ignored
        (gates / ".tmp-checkpoint-2").touch()
        # the child went on (the repeat did not end it): checkpoint-2 written, step 3 taken, the stop's save begun
        assert read_until("[held disk] writing") == "[held disk] writing .tmp-checkpoint-3"
        # a signal within 1 s of the first is its repeat: wait out that second (the save stays held meanwhile)
        time.sleep(max(0.0, first + 1.1 - time.monotonic()))
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out_text, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out_text = "".join(seen) + out_text
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1:] == ["[minirlhf] SIGTERM: exiting at once; checkpoints already written are "
                                             "complete"], err[-2000:]
    assert "Traceback" not in err and "stopped by" not in out_text
    assert out_text.count("finishing this step") == 1, out_text[-2000:]
    assert list(out.glob(".tmp-checkpoint-*"))  # it was cut off mid-save
    assert [p.name for p in out.glob(".tmp-checkpoint-*")] == [".tmp-checkpoint-3"]  # the stop's save, no other
    newest = resolve_resume(True, str(out), "reward")
    assert newest.name == "checkpoint-2"
    check_loads(newest)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank 1", "process group"])
def test_torchrun_ranks_agree_on_the_stop_step(task, target):
    """SIGTERM to rank 1 only: the all-reduced flag stops both ranks after the same step, and the checkpoint holds
    both ranks' random state (a rank stopping alone would leave the other hanging in a collective, then time out).
    SIGTERM to the process group (a terminal's Ctrl-C, a scheduler): every worker gets it twice, directly and as
    torchrun forwards it, and still saves, as for one signal."""
    tmp_path, flags = task
    proc = start_and_wait_for_step([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "minirlhf.reward", *flags, "--max_steps=2000",
                                    "--save_strategy=no", f"--output_dir={tmp_path / 'run'}"], start_new_session=True)
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    rank1 = [p for p in workers if b"RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
    if target == "rank 1":
        os.kill(rank1[0], signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and out.count("stopped by") == 1, err[-3000:]
    assert "".join(proc.seen).count("has no score head") == 1  # rank 0 says it, not every rank
    (checkpoint,) = checkpoint_dirs(tmp_path / "run")
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    check_loads(checkpoint)


FULL_DISK_ON_RANK_1 = """import errno, os, sys, torch
from minirlhf import reward
if os.environ["RANK"] == "1":  # rank 1 writes only its random state: its disk is full
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    torch.save = full_disk
reward.main(sys.argv[1:])
"""


def test_torchrun_full_disk_on_rank_1_stops_every_rank(task):
    """A full disk on rank 1 only, at the first checkpoint: both ranks agree on it (one all-reduced flag in place
    of each barrier) and exit 2 at once, with one line from rank 1; rank 0 does not wait for it at a barrier (nor
    time out in one with a traceback), and no checkpoint or temporary folder is left."""
    tmp_path, flags = task
    (tmp_path / "launch.py").write_text(FULL_DISK_ON_RANK_1)
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "launch.py"), *flags, "--max_steps=4", "--save_steps=2",
                           f"--output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=120)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
    assert "cannot save checkpoint-2" in ours[0] and "No space left on device" in ours[0], ours
    # no traceback through our code on rank 0 (its barrier or save failing as rank 1 left)
    assert "minirlhf/" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - began < 30  # torchrun's grace before it kills workers: nobody waited for it
    assert not [p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name]


# Rank 0's disk fills up while it writes the final model's weights (after a part of the file); each rank records
# how its run ended, since torchrun reports only the first failure.
FULL_DISK_IN_FINAL_SAVE_ON_RANK_0 = """import errno, os, sys
from pathlib import Path
from minirlhf import reward
from minirlhf.infra import hf
rank = os.environ["RANK"]
if rank == "0":
    def full_disk(tensors, path, metadata):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    hf.save_file = full_disk
code = 0
try:
    reward.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
    raise
finally:
    (Path(__file__).parent / f"exit-{rank}").write_text(str(code))
"""


@pytest.mark.slow
def test_torchrun_full_disk_in_final_save_on_rank_0_fails_every_rank(task):
    """A full disk on rank 0 while it alone writes the final model: every rank learns of it (one all-reduced flag)
    and exits 2, not only rank 0 with the others finishing 0; one line from rank 0, no traceback, no temporary
    folder left, and the model that was in output_dir before is intact."""
    tmp_path, flags = task
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "model", out)  # a previous final model, which the failed save must leave whole
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "launch.py").write_text(FULL_DISK_IN_FINAL_SAVE_ON_RANK_0)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "launch.py"), *flags, "--max_steps=2", "--save_strategy=no",
                           "--overwrite_output_dir=true", f"--output_dir={out}"], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)
    assert {p.name: p.read_text() for p in tmp_path.glob("exit-*")} == {"exit-0": "2", "exit-1": "2"}, \
        proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
    assert f"cannot save the final model in {out} ({out / '.tmp-save' / 'model.safetensors'}: " in ours[0], ours
    assert "No space left on device" in ours[0], ours
    # no traceback through our code (torchrun prints its own when a worker fails), no rank claiming success
    assert "minirlhf/" not in proc.stderr and "saved the final model" not in proc.stdout, proc.stderr[-3000:]
    assert not list(out.glob(".tmp-*"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before


# ---- kill -9


def check_loads(checkpoint: Path) -> None:
    """A checkpoint is complete: its weights, optimizer state and trainer state all load."""
    model = load_pretrained(RewardModel, str(checkpoint))
    load_checkpoint(checkpoint, AdamW(param_groups(model, 0.0), lr=1e-3))


def train_forever(flags: list[str], ready: int) -> None:
    """A training run that says on pipe `ready` (a byte) when it begins each checkpoint: loading is over."""
    from minirlhf.infra import run

    real = run.save_checkpoint

    def announced(*args, **kwargs):
        os.write(ready, b"s")
        real(*args, **kwargs)

    run.save_checkpoint = announced  # in this forked child only
    reward.main([*flags, "--max_steps=100000"])


def save_final_forever(model_dir: str, out: str, ready: int) -> None:
    """Rewrite a final model in `out` over and over, having said on pipe `ready` (a byte) that it has loaded."""
    model = load_pretrained(RewardModel, model_dir)
    os.write(ready, b"s")
    for i in range(100000):
        with torch.no_grad():
            next(model.parameters()).fill_(i)
        save_pretrained(model, out)


def kill_9_once_started(fork, target, args: tuple, delay: float) -> int | None:
    """Fork `target(*args, ready)`, wait until it has written its first byte to pipe `ready` (it has started what it
    is there to do), then `delay` seconds more, and kill -9 it; its exit code (-9 unless it ended on its own)."""
    read_end, ready = os.pipe()
    child = fork.Process(target=target, args=(*args, ready))
    try:
        child.start()
        os.close(ready)  # the child holds the only write end: its exit reads as end of file
        readable, _, _ = select.select([read_end], [], [], 120)
        assert readable and os.read(read_end, 1), f"the child ended or stalled before starting ({child.exitcode})"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    finally:
        os.close(read_end)
        if child.is_alive():
            child.kill()
            child.join()
    return child.exitcode


def test_kill_9_during_saves_never_leaves_a_broken_checkpoint(task):
    """24 kill -9 of a real training process that saves every step (save_total_limit 2), each at a random moment
    (0-0.5 s) after the process began its first save, each restart resuming the newest checkpoint: it is always
    complete, one is always there, no half-written one is picked. Then 12 kills, each 0-0.25 s after it has loaded,
    of a process rewriting a final model: the folder always loads whole."""
    tmp_path, flags = task
    out = tmp_path / "run"
    flags = [*flags, "--save_steps=1", "--save_total_limit=2", f"--output_dir={out}", "--logging_steps=1000"]
    fork = multiprocessing.get_context("fork")
    rng, steps = random.Random(0), []
    for kill in range(24):
        resume = ["--resume_from_checkpoint=true"] if checkpoint_dirs(out) else []
        exitcode = kill_9_once_started(fork, train_forever, ([*flags, *resume],), rng.uniform(0.0, 0.5))
        assert exitcode == -signal.SIGKILL, f"kill {kill}: the child ended on its own ({exitcode})"
        complete = checkpoint_dirs(out)
        if not complete:
            continue
        assert 1 <= len(complete) <= 3, complete  # 3: killed between the new one's rename and the rotation
        newest = resolve_resume(True, str(out), "reward")
        assert newest == complete[-1]
        check_loads(newest)
        steps.append(read_state(newest)["step"])
    assert len(steps) >= 20 and steps == sorted(steps) and steps[-1] > steps[0], steps  # progress, never lost

    final = tmp_path / "final"
    save_pretrained(load_pretrained(RewardModel, str(tmp_path / "model")), str(final))
    for _ in range(12):
        exitcode = kill_9_once_started(fork, save_final_forever, (str(tmp_path / "model"), str(final)),
                                       rng.uniform(0.0, 0.25))
        assert exitcode == -signal.SIGKILL, f"the child ended on its own ({exitcode})"
        load_pretrained(RewardModel, str(final))  # raises if the weights were missing or cut off


# ---- non-finite losses


def nan_row(tmp_path: Path) -> None:
    """One preference row with a NaN margin: the batch holding it has a NaN loss and NaN gradients."""
    path = tmp_path / "data" / "train.jsonl"
    rows = path.read_text().splitlines()
    row = json.loads(rows[13])
    row["margin"] = float("nan")
    rows[13] = json.dumps(row)  # writes NaN, which Python's json reads back
    path.write_text("\n".join(rows) + "\n")


def test_nonfinite_loss_stops_before_saving_it(task, capsys):
    """on_nonfinite = "stop": exit 1 at the bad step with one line naming the step and the quantity; checkpoints of
    every earlier step are there and finite, none of the bad step."""
    tmp_path, flags = task
    nan_row(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        reward.main([*flags, "--max_steps=16", "--save_steps=1", f"--output_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: step ") and "loss = nan" in line, line
    bad_step = int(line.split()[2].rstrip(":"))
    assert [int(p.name.split("-")[1]) for p in checkpoint_dirs(tmp_path / "run")] == list(range(1, bad_step))
    if bad_step > 1:
        weights = load_file(tmp_path / "run" / f"checkpoint-{bad_step - 1}" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_nonfinite_loss_skip_drops_the_update_and_counts_it(task):
    """on_nonfinite = "skip": the run completes; the steps with the NaN row (one per epoch) are skipped and counted,
    and the weights stay finite."""
    tmp_path, flags = task
    nan_row(tmp_path)
    reward.main([*flags, "--num_train_epochs=2", "--on_nonfinite=skip", "--save_strategy=no",
                 f"--output_dir={tmp_path / 'run'}"])
    metrics = read_metrics(tmp_path / "run")
    assert metrics[-2]["skipped_steps"] == 2 and metrics[-2]["step"] == 16
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


# ---- an output_dir that holds another run (issue 11, defect 1)


def test_fresh_run_into_another_runs_output_dir(task, capsys):
    """Run A leaves checkpoint-10 and -12 (save_total_limit 2). A fresh run B into the same folder is refused, with
    A's files untouched; with overwrite_output_dir it starts afresh, keeps its own newest checkpoints (it used to
    delete them at once, A's having higher steps), and resume_from_checkpoint = true then picks B's."""
    tmp_path, flags = task
    out = tmp_path / "run"
    reward.main([*flags, "--max_steps=12", "--save_steps=2", "--save_total_limit=2", f"--output_dir={out}"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    b_flags = [*flags, "--max_steps=4", "--save_steps=1", "--save_total_limit=2", f"--output_dir={out}"]
    with pytest.raises(SystemExit) as exit_info:
        reward.main(b_flags)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: output_dir: ") and "overwrite_output_dir" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    reward.main([*b_flags, "--overwrite_output_dir=true"])
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-3", "checkpoint-4"]
    assert len({read_state(p)["run_id"] for p in checkpoint_dirs(out)}) == 1
    assert resolve_resume(True, str(out), "reward").name == "checkpoint-4"
    assert_same_weights(out, out / "checkpoint-4")  # the final model is B's, not A's

    # A checkpoint of another run copied in: B's rotation leaves it alone; resume = true will not guess
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-99")
    state = json.loads((out / "checkpoint-99" / "trainer_state.json").read_text())
    (out / "checkpoint-99" / "trainer_state.json").write_text(json.dumps({**state, "run_id": "other"}))
    with pytest.raises(ValueError, match="checkpoints of 2 runs"):
        resolve_resume(True, str(out), "reward")


# ---- the final model save is atomic, and a folder without weights is refused (issue 11, defect 2)


def test_failed_final_save_keeps_the_previous_model(tmp_path, monkeypatch):
    """A crash while writing the weights leaves the previous model whole (it used to delete them first)."""
    model_dir = write_model(tmp_path / "model")
    old = load_pretrained(RewardModel, str(model_dir))
    save_pretrained(old, str(tmp_path / "out"))
    new = load_pretrained(RewardModel, str(model_dir))
    with torch.no_grad():
        next(new.parameters()).add_(1)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("minirlhf.infra.hf.save_file", crash)
    with pytest.raises(OSError):
        save_pretrained(new, str(tmp_path / "out"))
    loaded = load_pretrained(RewardModel, str(tmp_path / "out"))
    for (name, a), b in zip(loaded.state_dict().items(), old.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_soak_2000_steps_flat_memory(tmp_path):
    """2,000 steps saving every 50 with save_total_limit 2: RSS grows < 5% after warm-up, and exactly 2 checkpoints
    and the final model are left."""
    (tmp_path / "data").mkdir()
    write_pairs(tmp_path / "data" / "train.jsonl", 32, seed=1)
    model = write_model(tmp_path / "model")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "minirlhf.reward", f"--model_name_or_path={model}",
                             f"--dataset_name={tmp_path / 'data'}", "--disable_tqdm=true", "--max_steps=2000",
                             "--per_device_train_batch_size=4", "--logging_steps=100", "--save_steps=50",
                             "--save_total_limit=2", "--gradient_checkpointing=false", f"--output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    rss = {}
    for line in proc.stdout:
        step = next((int(w[5:]) for w in line.split() if w.startswith("step=")), None)
        if step is not None and step % 100 == 0:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss[step] = int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    assert rss[2000] < 1.05 * rss[400], rss
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1950", "checkpoint-2000"]
    assert (out / "model.safetensors").exists() and not list(out.glob(".*"))


@pytest.mark.parametrize("final", ["model.safetensors", "adapter_model.safetensors"])
def test_a_finished_run_is_found_whatever_it_saved(tmp_path, final):
    """A fresh run refuses an output_dir holding a finished run's final model, also a LoRA run's adapter."""
    from minirlhf.infra.run import check_output_dir
    from minirlhf.sft import SFTConfig

    (tmp_path / final).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"holds another run \({final}\).*overwrite_output_dir"):
        check_output_dir(SFTConfig(output_dir=str(tmp_path)), None)
    check_output_dir(SFTConfig(output_dir=str(tmp_path), overwrite_output_dir=True), None)
