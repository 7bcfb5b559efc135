"""Test helpers shared by several test files: PPO-shaped batches and two-rank runs."""

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from tiny import VOCAB


def rollout_rows(query_lengths, response_lengths, context_length, response_length, seed=0, pad=0):
    """PPO's layout: left-padded queries, then responses that end early are padded on the right."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((len(query_lengths), context_length + response_length), pad)
    for b, (q, r) in enumerate(zip(query_lengths, response_lengths, strict=True)):
        rows[b, context_length - q : context_length + r] = torch.randint(3, VOCAB, (q + r,), generator=g)
    return rows


def run_two_ranks(worker, *args) -> None:
    """worker(rank, 2, port, *args) in two spawned processes over a free local port; fails the test after 60 s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(worker, args=(2, port, *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 60
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the workers did not finish within 60 s")
