"""``python -m dptrain summary --config run.toml``: the model a training run would build,
layer by layer (blocks with their totals), with parameters, forward FLOPs and the
activation memory of a training step, and the memory per rank in all; nothing is trained
and no MPI is needed.

The model is sized from the dataset exactly as training sizes it (sample shape and number
of classes); the activation figures are the model's own estimates
(``Layer.activation_bytes``, the ones training checks a batch against) for the batch per
rank that the batch options and ``--ranks`` give.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from ..errors import UserError


def summary_parser(train_parser: Any) -> argparse.ArgumentParser:
    """The training parser (every training option), as the summary command."""
    p = train_parser()
    p.prog = "python -m dptrain summary"
    p.description = ("Show the model a training run with these options would build: "
                     "parameters, forward FLOPs and activation memory per layer or block, and "
                     "the memory per rank. Nothing is trained. Takes every training option.")
    p.add_argument("--ranks", type=int, default=1,
                   help="ranks the run will use (for the batch per rank; default: %(default)s)")
    p.add_argument("--full", action="store_true",
                   help="a row for every layer inside blocks too")
    return p


def _layers_by_name(model: Any) -> dict[str, Any]:
    """Every layer of a built model, blocks and the layers inside them, by full name."""
    found: dict[str, Any] = {}

    def walk(layers: list[Any]) -> None:
        for layer in layers:
            found[layer.name] = layer
            if layer.is_block:
                walk([x for _, chain in layer.paths() for x in chain.layers])

    walk(model.layers)
    return found


def summary_lines(model: Any, batch_per_rank: int, optimizer_slots: int,
                  full: bool = False) -> list[str]:
    """The table and the totals ``summary`` prints."""
    from ..nn.memory import format_bytes, model_bytes  # noqa: PLC0415
    from ..nn.summary import model_rows  # noqa: PLC0415

    layers = _layers_by_name(model)
    b = batch_per_rank
    head = ("layer", "output shape", "params", "FLOPs/sample", f"activations (batch {b})")
    table = [head, ("input", str(model.input_shape), "", "", "")]
    for r in model_rows(model, full):
        act = layers[r.name].activation_bytes(b)
        table.append((f"{r.label}  {r.description}", str(r.out_shape), f"{r.params:,}",
                      f"{r.flops:,}", format_bytes(act)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in table]
    lines.insert(1, "-" * max(len(line) for line in lines))
    params, weights = model_bytes(model.leaf_layers(), model.dtype)
    opt = optimizer_slots * params * model.dtype.itemsize
    acts = model.activation_bytes(b)
    flops = model.flops_per_sample()
    lines += [
        f"total parameters: {params:,} ({model.dtype.name}); forward FLOPs/sample: {flops:,} "
        f"({flops * b:,} per batch of {b})",
        f"memory per rank: {format_bytes(weights)} parameters, gradients and state + "
        f"{format_bytes(opt)} optimizer state ({optimizer_slots} slot(s)) + "
        f"{format_bytes(acts)} activations = {format_bytes(weights + opt + acts)}"]
    return lines


def cmd_summary(args: argparse.Namespace, run: Any) -> int:
    from ..cli import config_from_args  # noqa: PLC0415
    from ..data.stored import find_data  # noqa: PLC0415
    from ..optim import make_optimizer  # noqa: PLC0415
    from ..training.assembly import build_model, num_outputs  # noqa: PLC0415

    if args.ranks <= 0:
        raise UserError(f"--ranks must be positive, not {args.ranks}")
    cfg = config_from_args(args)
    data = find_data(cfg.data, dtype=cfg.model.dtype, seed=cfg.run.seed)  # nothing read
    try:
        model = build_model(cfg, data.train.sample_shape, num_outputs(data), np)
        name, samples = data.name, len(data.train)
    finally:
        data.close()
    op = cfg.optim
    optimizer = make_optimizer(op.optimizer, model.params, model.grads, np,
                               momentum=op.momentum, nesterov=op.nesterov)
    batch = -(-cfg.schedule.global_batch(args.ranks) // args.ranks)
    print(f"model for {name} ({samples} training samples); batch {batch} per "
          f"rank on {args.ranks} rank(s); optimizer {op.optimizer}")
    for line in summary_lines(model, batch, len(optimizer.state), args.full):
        print(line)
    return 0
