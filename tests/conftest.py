"""Shared test fixtures: every test starts from the same seed and leaves the default dtype as it found it."""

import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_dtype_threads():
    """Same seed and default dtype for every test; one thread: tiny models gain nothing from a second one, and on a
    busy 2-core machine two OpenMP threads stall at every op's barrier (test_generate: 93 s vs 7 s at load 7)."""
    torch.manual_seed(0)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """A main() called in-process installs SIGTERM/SIGINT handlers (infra.run.StopSignal); put pytest's back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory):
    """The shipped toy task's tiny Llama with seeded random weights saved, and its tokenizer: PPO refuses a model folder
    without weights, which configs/toytask/model is on purpose (reward and SFT start from a random init there)."""
    import shutil
    from pathlib import Path

    from minirlhf.infra.hf import load_pretrained, save_pretrained
    from minirlhf.model import CausalLM

    source = Path(__file__).resolve().parents[1] / "configs" / "toytask" / "model"
    folder = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    save_pretrained(load_pretrained(CausalLM, str(source), new_model=True), str(folder))
    for file in source.iterdir():
        if file.name != "config.json":
            shutil.copy(file, folder / file.name)
    return folder
