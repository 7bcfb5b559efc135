"""What a user sees under `torchrun -m minirlhf.<trainer>` (the README's front door) when the run cannot start: the
worker's one `error:` line, and torchrun's failure summary naming that same line as the root cause (not "To enable
traceback see ..."). torchrun then exits 1 with its own summary; `python -m` exits 2 with the line alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_bad_flag_under_torchrun_is_the_summarys_root_cause(tmp_path):
    line = "error: command line: learning_rate: must be finite, >= 0, < inf; got -1.0"
    cmd = ["-m", "minirlhf.reward", "configs/reward.toml", "--learning_rate=-1", f"--output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [line]

    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert launched.returncode == 1
    err = launched.stderr.splitlines()
    assert err[0] == line  # the worker's line first, before torchrun's summary
    root_cause = err[next(i for i, text in enumerate(err) if text.startswith("Root Cause")):]
    assert any(text.strip() == f"traceback : {line}" for text in root_cause), "\n".join(root_cause)
    assert not (tmp_path / "run").exists()
