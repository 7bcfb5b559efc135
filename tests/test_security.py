"""Security (issue 11, item 5): nothing in a model folder, checkpoint or Hub repo runs as code. Weights are read
from safetensors only, trainer state through torch.load(weights_only=True), `trust_remote_code` is refused and
code beside a model (`auto_map`, modeling_*.py) is never imported; Hub revisions can be pinned. Each payload
below would create a file if it ran, and each test checks that the file is not there (and that the payload does
run when unpickled the unsafe way, so that the test can fail)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import test_bad_input
import torch
from test_bad_input import FLAGS, MAINS, fails
from tiny import hf_model

from minirlhf import CausalLM
from minirlhf.infra.hf import load_pretrained


class Payload:
    """Pickles as a call to exec: whoever unpickles it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


base, ws = test_bad_input.base, test_bad_input.ws  # its fixtures: a model, data and finished runs, and a copy to damage


def plant(path: Path, marker: Path) -> None:
    """A pickle at `path` that creates `marker` when unpickled; proved live here with weights_only=False."""
    torch.save({"state": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload does not run: the test would prove nothing"
    marker.unlink()


@pytest.mark.parametrize("trainer", ["reward", "ppo"])
def test_pickled_weights_are_refused_unopened(capsys, ws, tmp_path, trainer):
    """A model folder whose only weights are pytorch_model.bin: one line saying safetensors only; never unpickled,
    and never a random init (reward's model_name_or_path may otherwise start from a weightless folder)."""
    marker = tmp_path / "ran"
    (ws / "model" / "model.safetensors").unlink()
    plant(ws / "model" / "pytorch_model.bin", marker)
    line = fails(capsys, ws, trainer)
    assert "pytorch_model.bin" in line and "safetensors only" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state_0.pth"])
def test_pickled_trainer_state_is_refused(capsys, ws, tmp_path, name):
    """A checkpoint's optimizer.pt or rng_state_0.pth crafted to run code on load: refused in one line naming it,
    and the code does not run (torch.load(weights_only=True) unpickles tensors and plain containers only)."""
    marker = tmp_path / "ran"
    checkpoint = ws / "reward_run" / "checkpoint-2"
    plant(checkpoint / name, marker)
    line = fails(capsys, ws, "reward", f"--resume_from_checkpoint={checkpoint}")
    assert name in line and "cannot restore" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("trainer", ["reward", "sft", "ppo"])
def test_trust_remote_code_is_refused_with_the_reason(capsys, ws, trainer):
    line = fails(capsys, ws, trainer, "--trust_remote_code=true")
    assert "trust_remote_code" in line and "never runs code" in line, line


def test_code_beside_a_model_is_never_imported(ws, tmp_path):
    """A model folder with transformers' `auto_map` and a modeling_*.py that would create a file on import trains
    as the architecture its model_type names; the module is not imported."""
    marker = tmp_path / "ran"
    config = json.loads((ws / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                          "AutoModelForSequenceClassification": "modeling_evil.EvilForSequenceClassification"}
    (ws / "model" / "config.json").write_text(json.dumps(config))
    (ws / "model" / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    MAINS["reward"]([*FLAGS["reward"](ws), f"--output_dir={tmp_path / 'out'}", "--max_steps=1"])
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not marker.exists() and "modeling_evil" not in sys.modules


def test_pinned_revision_is_the_one_loaded(tmp_path, monkeypatch):
    """model_revision (the `revision` load_pretrained gets) picks that snapshot of a Hub repo, not main's: two
    snapshots in huggingface_hub's offline cache layout, main pointing at the first."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    first, pinned = repo / "snapshots" / ("a" * 40), repo / "snapshots" / ("b" * 40)
    hf_model("llama").save_pretrained(first)
    shutil.copytree(first, pinned)
    theirs = hf_model("llama")
    with torch.no_grad():
        theirs.lm_head.weight.mul_(2)  # a weight that tells the snapshots apart
    theirs.save_pretrained(pinned)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    main = load_pretrained(CausalLM, "tiny-org/tiny-llama")
    loaded = load_pretrained(CausalLM, "tiny-org/tiny-llama", revision="b" * 40)
    torch.testing.assert_close(loaded.lm_head.weight, theirs.lm_head.weight)
    assert not torch.equal(main.lm_head.weight, loaded.lm_head.weight)


def test_hub_repo_without_safetensors_is_no_new_model(tmp_path, monkeypatch):
    """A Hub repo with weights only as pytorch_model.bin downloads (safetensors and json only) as a bare config.json:
    an error, not a random init, even as the starting model_name_or_path."""
    snapshot = tmp_path / "hub" / "models--tiny-org--pickled" / "snapshots" / ("a" * 40)
    hf_model("llama").config.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--tiny-org--pickled" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--pickled" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="no weights"):
        load_pretrained(CausalLM, "tiny-org/pickled", new_model=True)


@pytest.mark.parametrize("name", ["{ws}/sft*.jsonl", "$WS/sft.jsonl"])
def test_paths_are_files_not_patterns(capsys, ws, monkeypatch, name):
    """A path in a config is opened as written: no glob, no $VARIABLE (each would find ws/sft.jsonl here)."""
    monkeypatch.setenv("WS", str(ws))
    name = name.format(ws=ws)
    flags = [f for f in FLAGS["sft"](ws) if not f.startswith("--dataset_name=")] + [f"--dataset_name={name}"]
    line = fails(capsys, ws, "sft", flags=flags)
    assert name in line and "no such file" in line, line
