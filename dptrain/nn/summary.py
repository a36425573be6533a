"""Tables of a model's layers: the start-of-training summary and `dptrain inspect`.

Every layer and every block gets a row with its parameters and forward FLOPs per sample
(a block's row holds the totals of the layers inside it, which follow it, indented, and
named by their path inside the block).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """One layer or block of a model, as a table shows it."""

    name: str          # the full name, e.g. "03_residual.main.00_conv2d"
    label: str         # the name inside its parent block, indented by depth
    depth: int
    description: str   # the layer's repr: class and non-default options
    options: dict[str, Any]  # the options of its spec (a block's own, not its layers')
    out_shape: tuple[int, ...]
    params: int
    flops: int


def model_rows(model: Any, full: bool = True) -> list[Row]:
    """Rows for the layers of a built model, in forward order; without ``full`` the leaves
    inside blocks are left to their blocks' rows (nested blocks keep theirs)."""
    counts: dict[str, int] = {}
    for s in model.param_slots:
        counts[s.layer] = counts.get(s.layer, 0) + s.size
    rows: list[Row] = []

    def walk(layers: list[Any], depth: int, parent: str) -> None:
        for layer in layers:
            if depth and not (full or layer.is_block):
                continue
            label = layer.name[len(parent) + 1:] if parent else layer.name
            opts = layer.summary_options() if layer.is_block else layer.options()
            rows.append(Row(layer.name, "  " * depth + label, depth, repr(layer), opts,
                            tuple(layer.out_shape),
                            sum(counts.get(leaf.name, 0) for leaf in layer.leaves()),
                            layer.flops_per_sample()))
            if layer.is_block:
                walk([x for _, chain in layer.paths() for x in chain.layers], depth + 1,
                     layer.name)

    walk(model.layers, 0, "")
    return rows


def _align(table: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in table]


def summary_table(model: Any, full: bool = False) -> list[str]:
    """The lines of ``Sequential.summary()``'s table (header, rule, input, layers)."""
    table = [("layer", "output shape", "params", "FLOPs/sample"),
             ("input", str(model.input_shape), "", "")]
    table += [(f"{r.label}  {r.description}", str(r.out_shape), f"{r.params:,}",
               f"{r.flops:,}") for r in model_rows(model, full)]
    lines = _align(table, {2, 3})
    lines.insert(1, "-" * max(len(line) for line in lines))
    return lines


def architecture_rows(spec: dict[str, Any]) -> list[Row]:
    """Rows for every layer (inside blocks too) of the model an architecture spec (as
    stored in checkpoints) describes."""
    from .model import Sequential  # noqa: PLC0415  (model.py uses this module)

    return model_rows(Sequential.from_spec(spec), full=True)


def architecture_table(spec: dict[str, Any]) -> list[str]:
    """The lines of `dptrain inspect`'s layer table: name, options, params, FLOPs/sample."""
    table = [("layer", "options", "params", "FLOPs/sample")]
    table += [(r.label, json.dumps(r.options), f"{r.params:,}", f"{r.flops:,}")
              for r in architecture_rows(spec)]
    return _align(table, {2, 3})
