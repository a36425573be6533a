"""Draw a run's loss and accuracy curves from RUN_DIR/metrics.jsonl into a PNG.

    python scripts/plot_metrics.py runs/default              # writes runs/default/metrics.png
    python scripts/plot_metrics.py runs/default --out curves.png

Left: loss, right: accuracy, both against the optimizer step. Per-epoch training and test
values are lines with markers; the step records (``log_every``: the epoch's mean so far)
are a thin line;
dotted vertical lines mark the ends of epochs. When a resumed run logged a step twice,
the later record wins. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dptrain.cli import OneLineParser, fail


def read_metrics(path: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """(epoch records by step, step records by step) of metrics.jsonl; later lines win."""
    epochs: dict[int, dict[str, Any]] = {}
    steps: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write leaves a torn last line
                continue
            fail(f"{path}:{n} is not a JSON object")
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if rec.get("event") == "epoch":
            epochs[rec["step"]] = rec
        elif rec.get("event") == "step":
            steps[rec["step"]] = rec
    return epochs, steps


def series(records: dict[int, dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs = sorted(s for s, r in records.items() if isinstance(r.get(key), (int, float)))
    return xs, [float(records[s][key]) for s in xs]


def plot(run_dir: Path, out: Path) -> Path:
    """Write the figure for ``run_dir`` to ``out`` and return ``out``."""
    epochs, steps = read_metrics(run_dir / "metrics.jsonl")
    if not epochs and not steps:
        fail(f"{run_dir / 'metrics.jsonl'} holds no epoch or step records yet")
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        fail("plotting needs matplotlib: pip install 'dptrain[plot]'")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, what in ((ax_loss, "loss"), (ax_acc, "acc")):
        xs, ys = series(steps, f"train_{what}")
        if xs:
            ax.plot(xs, ys, lw=0.8, alpha=0.55, color="#4c72b0",
                    label="train (logged steps: epoch mean so far)")
        xs, ys = series(epochs, f"train_{what}")
        if xs:
            ax.plot(xs, ys, "o-", color="#4c72b0", label="train (epoch mean)")
        xs, ys = series(epochs, f"test_{what}")
        if xs:
            ax.plot(xs, ys, "s-", color="#dd8452", label="test (end of epoch)")
        for s in sorted(epochs):  # a partial epoch (a run stopped by max_steps) ends nothing
            if not epochs[s].get("partial"):
                ax.axvline(s, color="#999999", lw=0.6, ls=":")
        ax.set_xlabel("optimizer step (dotted lines: ends of epochs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    if epochs:
        last = epochs[max(epochs)]
        whole = sum(1 for r in epochs.values() if not r.get("partial"))
        part = " and a partial one" if len(epochs) > whole else ""
        fig.suptitle(f"{run_dir.name}: {whole} epoch(s){part}, step {max(epochs)}, "
                     f"last train loss {last.get('train_loss', float('nan')):.4f}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python scripts/plot_metrics.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help="PNG to write "
                   "(default RUN_DIR/metrics.png)")
    args = p.parse_args(argv)
    if not args.run_dir.is_dir():
        fail(f"{args.run_dir} is not a directory")
    if not (args.run_dir / "metrics.jsonl").is_file():
        fail(f"{args.run_dir} has no metrics.jsonl (is it a dptrain run directory?)")
    out = plot(args.run_dir, args.out or args.run_dir / "metrics.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
