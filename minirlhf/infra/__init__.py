"""The machine room: what makes minirlhf run anywhere and survive anything, and what a first reading skips.

Configuration and `--help` (config.py), a run's lifecycle: output_dir checks, stop signals, the non-finite guard,
checkpoints and final saves (run.py, checkpoint.py, metrics.py), several ranks (parallel.py), padding-free forwards
(packing.py), LoRA (lora.py), Hugging Face files and tokenizers (hf.py, tokenizer.py, files.py), PPO's loading and
text scoring (ppo_setup.py, completions.py) and the shipped toy task (toytask.py). In one process, without LoRA, every
call into it from the reading floor is a no-op, I/O, or an optimisation with the same results.
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
