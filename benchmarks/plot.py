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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install 'minirlhf[plot]'") from None

    runs = {}
    for path in args.metrics.split(","):
        with open(path) as f:
            runs[Path(path).parent.name] = [json.loads(line) for line in f if line.strip()]
    fig, axes = plt.subplots(1, len(args.keys), figsize=(4 * len(args.keys), 3), squeeze=False)
    for ax, key in zip(axes[0], args.keys, strict=True):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            if not points:
                raise SystemExit(f"error: {name}: no record has the key {key!r}")
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=name)
        if len(runs) > 1:
            ax.legend(fontsize=8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
