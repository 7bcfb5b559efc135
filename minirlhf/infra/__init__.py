"""The machine room: what makes minirlhf run anywhere and survive anything, and what a first reading skips.

Config and `--help`, a run's lifecycle (output_dir checks, stop signals, the non-finite guard, checkpoints, final
saves, metrics), several ranks, padding-free forwards, LoRA, Hugging Face files and tokenizers, PPO's loading and text
scoring, the toy task. Without LoRA and in one process, what the reading floor calls here is I/O, a no-op or a
shortcut with the same results.
"""

import os
import sys


def _interrupted_while_starting(signum, frame) -> None:
    print("[minirlhf] SIGINT while starting: exiting at once", file=sys.stderr, flush=True)
    os._exit(130)


def exit_quietly_on_ctrl_c_while_starting() -> None:
    """`python -m minirlhf.<trainer>` (Python sets argv[0] to "-m" while it imports the module's packages): a Ctrl-C
    while torch and the rest are imported exits with one line, not a KeyboardInterrupt traceback, until the trainer
    installs its own handler (run.StopSignal). A plain `import minirlhf` leaves the caller's SIGINT handling alone."""
    if sys.argv[:1] == ["-m"]:
        import signal

        signal.signal(signal.SIGINT, _interrupted_while_starting)
