"""Another system's benchmark figures and dptrain's targets, read from a data file
(scripts/reference/*.json) that says which machine and software the figures came from.

Not a script: scripts/bench_matrix.py imports it from its own directory. The file holds

- ``system`` and ``short_name`` (e.g. "PyTorch 2.13 (CPU)" and "PyTorch"), ``about``;
- ``measurements``: groups of figures taken on one machine with one workload, each with
  ``machine``, ``machine_short``, ``software``, ``source``, an optional ``note``,
  ``workload`` (``input_shape``, ``batch_per_rank``, optional ``classes``, ``dtype`` and
  anything else worth saying, in the order to print) and ``samples_per_sec``,
  a list of ``{"model", "layout": "RANKSxTHREADS", "value"}`` or ``"range": [low, high]``;
- ``targets``: ``{"model", "layout", "metric", "at_least" | "at_most"}`` with a metric of
  METRICS.

Adding a model's figures or a target is an edit of that file alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dptrain.errors import UserError

#: metric of a target -> what it measures (the target table's wording)
METRICS = {
    "vs_reference": "samples/s over the reference system's (the top of a range)",
    "gemm_bound": "samples/s over the bound set by the GEMMs the step performs",
    "gemm_bound_3x_forward": "samples/s over the bound of 3 x forward FLOPs in GEMMs",
    "scaling": "samples/s over the same model's at 1 rank x 1 thread",
    "sync_per_allreduce": "the step's gradient sum over one raw allreduce of its size",
}

Layout = tuple[int, int]


def samples(x: float) -> str:
    """A samples/s figure as the reports print it: 8,271, or 3 significant digits below 100."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def parse_layout(text: str) -> Layout:
    """"2x1" -> (2, 1): ranks x BLAS threads per rank."""
    try:
        ranks, threads = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise UserError(f"a layout is RANKSxTHREADS like 1x1 or 2x1, not {text!r}") from None
    if ranks < 1 or threads < 1:
        raise UserError(f"a layout needs ranks and threads >= 1, not {text!r}")
    return ranks, threads


def layout_text(layout: Layout) -> str:
    return f"{layout[0]}x{layout[1]}"


@dataclass(frozen=True, eq=False)
class Measurements:
    """Figures taken on one machine with one workload."""

    machine: str
    machine_short: str
    software: str
    source: str
    workload: dict[str, Any]
    note: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.workload["input_shape"])

    def describe(self) -> str:
        """Where and how the figures were taken, in one line."""
        w = dict(self.workload)
        parts = [f"synthetic {'x'.join(str(d) for d in w.pop('input_shape'))} inputs"]
        if "classes" in w:
            parts.append(f"{w.pop('classes')} classes")
        parts.append(f"batch {w.pop('batch_per_rank')} per rank")
        parts += [str(v) for v in w.values()]  # dtype, optimizer, ...
        note = f"; {self.note}" if self.note else ""
        return (f"on {self.machine} ({self.software}; {', '.join(parts)}{note}; "
                f"from {self.source})")


@dataclass(frozen=True)
class Figure:
    """The reference system's samples/s for one model and layout (low == high unless it
    was a range over repeated runs)."""

    model: str
    layout: Layout
    low: float
    high: float
    taken: Measurements

    def text(self) -> str:
        return (samples(self.low) if self.low == self.high
                else f"{samples(self.low)}-{samples(self.high)}")


@dataclass(frozen=True)
class Target:
    """``metric`` of ``model`` at ``layout`` must be at least (or at most) ``limit``."""

    model: str
    layout: Layout
    metric: str
    limit: float
    at_least: bool

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit


@dataclass(frozen=True)
class Reference:
    system: str
    short_name: str
    about: str
    figures: dict[tuple[str, Layout], Figure]
    targets: list[Target]
    path: Path

    def figure(self, model: str, layout: Layout) -> Figure | None:
        return self.figures.get((model, layout))

    def input_shape(self, model: str) -> tuple[int, ...] | None:
        """The input shape of the model's reference figures, if it has any."""
        for (m, _), fig in self.figures.items():
            if m == model:
                return fig.taken.input_shape
        return None

    def groups(self) -> list[Measurements]:
        return list(dict.fromkeys(f.taken for f in self.figures.values()))


def _need(entry: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise UserError(f"{where}: needs {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: {value!r} is not a positive number")
    return float(value)


def _layout(entry: dict[str, Any], where: str) -> Layout:
    try:
        return parse_layout(_need(entry, "layout", str, where))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _figure(entry: dict[str, Any], taken: Measurements, where: str) -> Figure:
    model = _need(entry, "model", str, where)
    layout = _layout(entry, where)
    if ("value" in entry) == ("range" in entry):
        raise UserError(f"{where}: give either 'value' or 'range' [low, high]")
    if "value" in entry:
        low = high = _number(entry["value"], where)
    else:
        pair = _need(entry, "range", list, where)
        if len(pair) != 2:
            raise UserError(f"{where}: 'range' is [low, high]")
        low, high = (_number(v, where) for v in pair)
        if low > high:
            raise UserError(f"{where}: 'range' {pair} runs backwards")
    return Figure(model, layout, low, high, taken)


def _measurements(entry: dict[str, Any], where: str) -> tuple[Measurements, list[Any]]:
    workload = _need(entry, "workload", dict, where)
    shape = _need(workload, "input_shape", list, f"{where} workload")
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"{where} workload: 'input_shape' is [height, width, channels]")
    _need(workload, "batch_per_rank", int, f"{where} workload")
    note = entry.get("note", "")
    if not isinstance(note, str):
        raise UserError(f"{where}: 'note' is text")
    taken = Measurements(*(_need(entry, k, str, where) for k in
                           ("machine", "machine_short", "software", "source")), workload, note)
    return taken, _need(entry, "samples_per_sec", list, where)


def _target(entry: dict[str, Any], where: str) -> Target:
    model = _need(entry, "model", str, where)
    layout = _layout(entry, where)
    metric = _need(entry, "metric", str, where)
    if metric not in METRICS:
        raise UserError(f"{where}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if ("at_least" in entry) == ("at_most" in entry):
        raise UserError(f"{where}: give either 'at_least' or 'at_most'")
    at_least = "at_least" in entry
    limit = _number(entry["at_least" if at_least else "at_most"], where)
    return Target(model, layout, metric, limit, at_least)


def load_reference(path: str | Path) -> Reference:
    """The reference file at ``path``, checked; a UserError names what is wrong in it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"reference file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"reference file {path} is not JSON: {e}") from None
    name = f"reference file {path}"
    figures: dict[tuple[str, Layout], Figure] = {}
    for i, group in enumerate(_need(doc, "measurements", list, name)):
        taken, entries = _measurements(group, f"{name}, measurements[{i}]")
        for j, entry in enumerate(entries):
            fig = _figure(entry, taken, f"{name}, measurements[{i}].samples_per_sec[{j}]")
            key = (fig.model, fig.layout)
            if key in figures:
                raise UserError(f"{name}: two figures for {fig.model} "
                                f"{layout_text(fig.layout)}")
            figures[key] = fig
    targets = [_target(t, f"{name}, targets[{i}]")
               for i, t in enumerate(_need(doc, "targets", list, name))]
    for t in targets:
        if t.metric == "vs_reference" and (t.model, t.layout) not in figures:
            raise UserError(f"{name}: a target against {t.model} {layout_text(t.layout)} "
                            "has no figure to compare with")
    return Reference(_need(doc, "system", str, name), _need(doc, "short_name", str, name),
                     str(doc.get("about", "")), figures, targets, path)
