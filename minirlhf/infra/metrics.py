"""Where a run's numbers go: rank 0 writes each log event to output_dir/metrics.jsonl (TRL's keys), the console
and the tracker `report_to` names; `LogWindow` keeps what the next log averages, as transformers' Trainer does.

Trackers (optional extras, checked when the config is read): "tensorboard" writes event files to
output_dir/runs/<run_name>; "wandb" a run in output_dir/wandb/ (offline with WANDB_MODE=offline, else synced to the
project WANDB_PROJECT); "trackio" a run in its local database under TRACKIO_DIR (default: ~/.cache/huggingface/trackio),
project TRACKIO_PROJECT. Both projects default to "huggingface", as transformers' callbacks do.
"""

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


def keep_records_up_to(path: Path, step: int) -> None:
    """Keep the records of a JSON-lines log up to `step`: a fresh run (step 0) starts it anew, and a resumed run drops
    what the interrupted one logged after its checkpoint (and a line cut off by a crash), so no step appears twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines() if step else []:
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
    path.write_text("".join(kept))


@dataclass
class LogWindow:
    """What the next log averages, as transformers' Trainer keeps it (`tr_loss`, and TRL's `_metrics` lists): the
    loss summed over the micro-batches since the last log and divided by the optimizer steps they made; each other
    metric averaged over its micro-batches. Kept in trainer_state.json (`asdict`), so a resumed run logs the same."""

    loss: float = 0.0
    steps: int = 0
    metrics: dict[str, list[float]] = field(default_factory=dict)
    total_loss: float = 0.0  # the loss of every step already logged, for train_loss

    def add(self, loss: float, metrics: dict[str, float] | None = None) -> None:
        """One micro-batch: its share of its step's loss, and its metrics."""
        self.loss += loss
        for key, value in (metrics or {}).items():
            self.metrics.setdefault(key, []).append(value)

    def metric_means(self) -> dict[str, float]:
        return {key: sum(values) / len(values) for key, values in self.metrics.items()}

    def pop(self) -> dict[str, float]:
        """{"loss": mean step loss, **metric means} since the last log, and start a new window."""
        means = {"loss": self.loss / self.steps, **self.metric_means()}
        self.total_loss += self.loss
        self.loss, self.steps, self.metrics = 0.0, 0, {}
        return means


def start_tracker(report_to: str, output_dir: Path, run_name: str, config: dict):
    """(log(scalars, step), close) of the tracker `report_to` names (see the module docstring), or None for "none"."""
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "runs" / run_name))
        return lambda scalars, step: [writer.add_scalar(k, v, step) for k, v in scalars.items()], writer.close
    if report_to == "wandb":
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=run_name, dir=str(output_dir),
                         config=config)
        return lambda scalars, step: run.log(scalars, step=step), run.finish
    if report_to == "trackio":
        import trackio

        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "huggingface"), name=run_name, config=config)
        return lambda scalars, step: trackio.log(scalars, step=step), trackio.finish
    return None


class MetricsLogger:
    """Rank 0 writes each log event to metrics.jsonl, the console (via tqdm) and the tracker of report_to."""

    def __init__(self, args, is_main: bool, total_steps: int, done_steps: int = 0):
        """`args`: a TrainingConfig (output_dir, report_to, disable_tqdm, run_name); the bar starts at done_steps."""
        self.is_main = is_main
        self.file = self.tracker = self.bar = None
        if not is_main:
            return
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        keep_records_up_to(output_dir / "metrics.jsonl", done_steps)
        self.file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        run_name = args.run_name or output_dir.name
        self.tracker = start_tracker(args.report_to, output_dir, run_name, dataclasses.asdict(args))
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=done_steps, disable=args.disable_tqdm, dynamic_ncols=True,
                        desc=run_name)
        self.tqdm_write = tqdm.write

    def update(self) -> None:
        """One step (PPO: update) done: the progress bar moves."""
        if self.bar is not None:
            self.bar.update()

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        self.tqdm_write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if self.tracker is not None:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
            self.tracker[0](scalars, metrics.get("step", 0))

    def close(self) -> None:
        for handle in (self.bar, self.file):
            if handle is not None:
                handle.close()
        if self.tracker is not None:
            self.tracker[1]()
