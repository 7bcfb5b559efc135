"""Plot metrics from a run's metrics.jsonl against its step (needs matplotlib, an optional extra).

Usage: `python benchmarks/plot.py runs/ppo/metrics.jsonl objective/scores objective/gold_score --out ppo.png`
(it drew benchmarks/toy_reward.png and toy_ppo.png; a script beside the benchmarks, not part of the package).
Each key gets its own panel; records without the key (e.g. eval records for a train key) are skipped. Several runs,
comma-separated, share the panels, one line each labelled by its folder (it drew toy_estimators.png):
`python benchmarks/plot.py runs/ppo_gold/metrics.jsonl,runs/rloo/metrics.jsonl objective/gold_score --out x.png`
"""

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="a metrics.jsonl written by minirlhf.reward, .sft or .ppo (or several, comma-"
                                        "separated)")
    parser.add_argument("keys", nargs="+", help="metric names, e.g. eval_accuracy or objective/gold_score")
    parser.add_argument("--out", default="metrics.png", help="image file to write")
    args = parser.parse_args(argv)
    runs = {}  # read and checked first: a wrong path or key is one line, with or without matplotlib
    for path in args.metrics.split(","):
        runs[Path(path).parent.name] = read_records(path)
    for key in args.keys:
        for name, records in runs.items():
            if not any(key in r and "step" in r for r in records):
                keys = sorted({k for r in records for k in r})
                raise SystemExit(f"error: {name}: no record has the key {key!r}; its keys: {', '.join(keys)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install 'minirlhf[plot]'") from None

    fig, axes = plt.subplots(1, len(args.keys), figsize=(4 * len(args.keys), 3), squeeze=False)
    for ax, key in zip(axes[0], args.keys, strict=True):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=name)
        if len(runs) > 1:
            ax.legend(fontsize=8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


def read_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a file that cannot be read, or a line that is not JSON, is one line naming it."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise SystemExit(f"error: {path}: cannot read ({e.strerror or e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}: line {n}: invalid JSON ({e.msg})") from None
    return records


if __name__ == "__main__":
    main()
