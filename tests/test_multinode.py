"""The README's several-node recipe, run as two torchrun "nodes" on this machine (gloo over 127.0.0.1): one process
per node, rendezvous at node 0, and the run equals one process on the doubled batch, as one node with two processes
does (tests/test_reward.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from reward_fixtures import write_model, write_pairs
from safetensors.torch import load_file

from minirlhf import reward

KEYS = ["loss", "grad_norm", "learning_rate", "num_tokens", "accuracy", "margin"]


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_one_process_with_double_batch(tmp_path):
    (tmp_path / "data").mkdir()
    write_pairs(tmp_path / "data" / "train.jsonl", 28, seed=1)
    model_dir = write_model(tmp_path / "model")
    common = [f"--model_name_or_path={model_dir}", f"--dataset_name={tmp_path / 'data'}", "--disable_tqdm=true",
              "--learning_rate=3e-3", "--logging_steps=1", "--max_steps=3", "--save_strategy=no",
              "--eval_strategy=no", "--gradient_accumulation_steps=2"]
    reward.main([*common, f"--output_dir={tmp_path / 'one'}", "--per_device_train_batch_size=4"])

    # the recipe: the same command on every node, each with its --node_rank, all pointing at node 0's address
    port, env = free_port(), {**os.environ, "PYTHONPATH": os.getcwd()}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "minirlhf.reward", *common, f"--output_dir={tmp_path / 'two'}",
                               "--per_device_train_batch_size=2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one[:-1], two[:-1], strict=True):
        for key in KEYS:
            torch.testing.assert_close(float(b[key]), float(a[key]), rtol=1e-5, atol=1e-6, msg=key)
    one_w, two_w = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name, tensor in one_w.items():
        torch.testing.assert_close(two_w[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
