"""What ``python -m dptrain eval`` prints (loss, top-1, top-5, per-class accuracy, the
confusion matrix) and the confusion matrix as a PNG (``--confusion-png``, matplotlib: the
``plot`` extra)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import check_writable, fsync_dir, temp_name
from ..errors import UserError

#: the largest confusion matrix printed in full (a wider one goes to --confusion-png)
MAX_PRINTED_CLASSES = 30


def report_lines(res: dict[str, Any], head: str, source: str = "") -> list[str]:
    """The report of an evaluation with ``confusion`` (or without: loss and accuracy);
    ``head`` starts the first line (the file and split), ``source`` ends it."""
    line = (f"{head} loss {res['loss']:.4f} accuracy {res['accuracy']:.4f} "
            f"({res['samples']} samples{', ' + source if source else ''})")
    if "top5" in res:
        line += f"; top-5 {res['top5']:.4f}"
    conf = res.get("confusion")
    if conf is None:
        return [line]
    lines = [line]
    from ..training.evaluate import per_class_accuracy  # noqa: PLC0415

    per = per_class_accuracy(conf)
    totals = conf.sum(axis=1)
    lines.append("per-class accuracy (class: accuracy of its samples):")
    lines += ["  " + "  ".join(_class_cell(c, per[c], totals[c]) for c in row)
              for row in np.array_split(np.arange(len(per)), max(1, -(-len(per) // 5)))]
    c = conf.shape[0]
    if c > MAX_PRINTED_CLASSES:
        lines.append(f"confusion matrix: {c} x {c} classes, too wide to print (draw it with "
                     "--confusion-png)")
        return lines
    width = max(len(str(int(conf.max(initial=0)))), len(str(c - 1)), 3)
    lines.append("confusion matrix (rows: true class, columns: predicted class):")
    lines.append(" " * 7 + " ".join(f"{j:>{width}}" for j in range(c)))
    lines += [f"  {i:>4} " + " ".join(f"{int(v):>{width}}" for v in conf[i]) for i in range(c)]
    return lines


def _class_cell(c: int, acc: float, total: int) -> str:
    value = "   n/a" if not total else f"{acc:.4f}"
    return f"{c:>4}: {value} ({int(total)})"


def check_png_path(path: str) -> None:
    """Before evaluating: matplotlib is there and the PNG can be written where asked."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise UserError(f"--confusion-png {p}: the file name must end in .png")
    check_writable(p, "--confusion-png")
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        raise UserError("--confusion-png needs matplotlib: pip install 'dptrain[plot]'") \
            from None


def draw_confusion(conf: np.ndarray, path: str, title: str) -> None:
    """The confusion matrix as a PNG: each row as fractions of its true class (colour),
    with the counts written in the cells when there are 20 classes or fewer. Written to a
    temporary name, then renamed."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    c = conf.shape[0]
    totals = conf.sum(axis=1, keepdims=True)
    frac = np.divide(conf, np.maximum(totals, 1), dtype=np.float64)
    size = min(12.0, 3.0 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    try:
        im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(im, ax=ax, label="fraction of the true class")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title, fontsize=9)
        if c <= 20:
            ax.set_xticks(range(c))
            ax.set_yticks(range(c))
            for i in range(c):
                for j in range(c):
                    if conf[i, j]:
                        ax.text(j, i, str(int(conf[i, j])), ha="center", va="center",
                                fontsize=7, color="white" if frac[i, j] > 0.5 else "black")
        p = Path(path)
        tmp = temp_name(p)
        try:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
            os.replace(tmp, p)
            fsync_dir(p.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write {p}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
