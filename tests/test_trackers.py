"""report_to: each tracker TRL users have (tensorboard, wandb offline, trackio) receives the run's logged values, read
back with the tracker's own reader; a tracker whose extra is missing is one `error:` line, exit 2, before anything is
loaded or written."""

import json
import sys
from pathlib import Path

import pytest

from minirlhf import reward
from minirlhf.infra import config

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, report_to: str) -> list[dict]:
    """Three steps of the toy reward model, logging every step; the records of metrics.jsonl that hold a loss."""
    reward.main([str(ROOT / "configs" / "reward.toml"), f"--model_name_or_path={ROOT / 'configs/toytask/model'}",
                 f"--dataset_name={ROOT / 'configs/toytask/preference'}", "--max_steps=3", "--logging_steps=1",
                 "--eval_strategy=no", "--save_strategy=no", "--per_device_train_batch_size=4", "--disable_tqdm=true",
                 f"--output_dir={out}", f"--report_to={report_to}", "--run_name=toy"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def test_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = train(tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "runs" / "toy")).Reload()
    ours = [(r["step"], r["loss"]) for r in logged]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == ours


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = train(tmp_path / "run", "wandb")
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # the run's records (protobuf, read by `wandb sync`) hold each logged value as its JSON text
    data = files[0].read_bytes()
    assert all(json.dumps(r["loss"]).encode() in data and json.dumps(r["grad_norm"]).encode() in data for r in logged)


def test_trackio(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "minirlhf-test")
    logged = train(tmp_path / "run", "trackio")
    from trackio.sqlite_storage import SQLiteStorage

    logs = [entry for entry in SQLiteStorage.get_logs("minirlhf-test", "toy") if "loss" in entry]
    assert [(e["step"], pytest.approx(e["loss"])) for e in logs] == [(r["step"], r["loss"]) for r in logged]


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "trackio"])
def test_missing_extra_is_one_line_before_anything(tracker, tmp_path, monkeypatch, capsys):
    find_spec = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None if name == tracker else find_spec(name))
    monkeypatch.setitem(sys.modules, tracker, None)  # and an import of it would fail
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", tracker)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: command line: report_to: {tracker!r} needs the {tracker} package: pip install 'minirlhf[{tracker}]'"]
    assert not (tmp_path / "run").exists()
