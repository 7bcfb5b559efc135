"""minirlhf: a minimal, pure-PyTorch reference implementation of RLHF (reward-model training and PPO)."""

import os
import sys


def _interrupted_while_starting(signum, frame) -> None:
    print("[minirlhf] SIGINT while starting: exiting at once", file=sys.stderr, flush=True)
    os._exit(130)


# `python -m minirlhf.<trainer>` (Python sets argv[0] to "-m" while it imports the module's packages): a Ctrl-C while
# torch and the rest are imported exits with one line, not a KeyboardInterrupt traceback, until the trainer installs
# its own handler (training.StopSignal). A plain `import minirlhf` leaves the caller's SIGINT handling alone.
if sys.argv[:1] == ["-m"]:
    import signal

    signal.signal(signal.SIGINT, _interrupted_while_starting)

from minirlhf.model import CausalLM, ModelConfig, RewardModel  # noqa: E402 (after the handler: torch is slow to import)

__all__ = ["CausalLM", "ModelConfig", "RewardModel"]
__version__ = "0.1.0"
