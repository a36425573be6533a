"""``python -m dptrain predict --model PATH --input FILE --output preds.h5``: predictions
for every sample of an input file, a batch at a time (the input may be larger than
memory), written atomically (a temporary name in the output's directory, fsync, rename).

The output (HDF5) holds ``probabilities`` (N, classes) and ``top_classes`` (N, k), most
probable first, for a classifier, or ``values`` (N, *outputs) for a regression model, and
attributes naming the model and the input. One process, no MPI.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import check_writable
from ..errors import UserError


def predict_parser(parser_class: Any) -> argparse.ArgumentParser:
    p = parser_class(prog="python -m dptrain predict",
                     description="Predict every sample of an input file with a saved model or "
                                 "checkpoint: class probabilities and the top-k classes, or "
                                 "values for a regression model. One process, no MPI.")
    p.add_argument("--model", required=True, help="model.h5 or checkpoint file")
    p.add_argument("--input", required=True,
                   help="samples (N, *input shape): an .h5/.hdf5 or .npz file")
    p.add_argument("--key", default="x",
                   help="the array of the input file, e.g. test/x (HDF5) or x_test (npz) "
                        "(default: %(default)s)")
    p.add_argument("--output", required=True, help="predictions file to write (.h5)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples per forward pass (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=5,
                   help="classes to list per sample, at most the number of classes "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--traceback", action="store_true", help="show the stack on errors")
    return p


def check_output(path: Path, *others: Path) -> None:
    """The predictions file can be written where asked, and clobbers no input."""
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise UserError(f"--output {path}: predictions are written as HDF5; name it .h5")
    check_writable(path, "--output")
    for other in others:
        if path.exists() and other.exists() and path.samefile(other):
            raise UserError(f"--output {path} is the file read from; write elsewhere")


def cmd_predict(args: argparse.Namespace, run: Any) -> int:
    from ..data.array_file import open_array  # noqa: PLC0415  (keeps --help fast)
    from ..inference import load_model  # noqa: PLC0415
    from ..parallel.launch import launcher_world_size  # noqa: PLC0415

    if launcher_world_size() > 1:
        raise UserError("predict runs in one process; start it without mpiexec/srun")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, not {args.batch_size}")
    if args.top_k <= 0:
        raise UserError(f"--top-k must be positive, not {args.top_k}")
    out, model_path, input_path = Path(args.output), Path(args.model), Path(args.input)
    check_output(out, model_path, input_path)
    predictor = load_model(model_path, device=args.device)
    with open_array(input_path, args.key) as source:
        if len(source) == 0:
            raise UserError(f"input {input_path}: {args.key!r} holds no samples")
        predictor.prepare(source.read(0, 1))  # the shape is checked before any writing
        n = write_predictions(out, predictor, source, args)
    print(f"{out}: {predictor.kind} of {n} samples from {input_path}:{args.key} "
          f"({model_path})")
    return 0


def write_predictions(path: Path, predictor: Any, source: Any, args: argparse.Namespace
                      ) -> int:
    """Stream ``source`` through ``predictor`` into a temporary HDF5 file, then rename it
    onto ``path``; nothing is left under either name on failure."""
    import h5py  # noqa: PLC0415

    from ..atomic import fsync_dir, temp_name  # noqa: PLC0415

    n, bs = len(source), args.batch_size
    classifier = predictor.kind == "probabilities"
    shape = predictor.output_shape
    k = min(args.top_k, shape[0]) if classifier else 0
    rows = max(1, min(n, bs))
    tmp = temp_name(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format": "dptrain predictions", "dptrain_version": __version__,
                            "model": str(args.model), "input": str(args.input),
                            "key": args.key, "kind": predictor.kind, "samples": n})
            main = f.create_dataset(predictor.kind, (n, *shape), predictor.model.dtype,
                                    chunks=(rows, *shape), fletcher32=True)
            top = (f.create_dataset("top_classes", (n, k), np.int64, chunks=(rows, k),
                                    fletcher32=True) if classifier else None)
            for start in range(0, n, bs):
                stop = min(start + bs, n)
                y = predictor.forward(predictor.prepare(source.read(start, stop), start),
                                      start)
                main[start:stop] = y
                if top is not None:
                    top[start:stop] = predictor.top_classes(y, k)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
