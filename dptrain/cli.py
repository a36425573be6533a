"""The command line: ``python -m dptrain [train|eval|inspect]``.

User mistakes print one line (rank 0 only) and exit with 2; ``--traceback`` shows the
stack. Any other exception on any rank prints there, tagged with the rank, and aborts the
whole MPI job so that no rank is left waiting in a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, preempt
from .config import FIELDS, load_toml, make_config, parse_value
from .errors import EXIT_FAILURE, EXIT_USER_ERROR, UserError, agreed

COMMANDS = ("train", "eval", "inspect")


def fail(message: str) -> NoReturn:
    """Report a user mistake in one line and exit with 2 (also used by scripts/)."""
    print(f"dptrain: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports mistakes in one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def _type_name(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return type(default).__name__


def train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dptrain [train]",
                description="Train a model data-parallel over MPI ranks (or in one process). "
                            "Other commands: `eval`, `inspect` (see `python -m dptrain eval "
                            "--help`). Options override the config file; every option is "
                            "also a config-file key (with underscores).")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--traceback", action="store_true", help="show the stack on errors")
    p.add_argument("--version", action="version", version=f"dptrain {__version__}")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata['help']} (default: {default!r})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_)
        elif name == "layers":
            p.add_argument(flag, dest=name, metavar="JSON", default=None, help=help_)
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else _type_name(f).upper()
            p.add_argument(flag, dest=name, metavar=metavar, default=None, help=help_)
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dptrain eval",
                description="Evaluate a saved model or checkpoint (rebuilt from the file "
                            "alone) on a dataset split; works under mpiexec too.")
    p.add_argument("--checkpoint", help="checkpoint or model file (default: RUN_DIR/model.h5)")
    p.add_argument("--run-dir", default="runs/default", help="run directory (default: %(default)s)")
    p.add_argument("--dataset", help="dataset (default: the one in the file's config)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu")
    p.add_argument("--allow-gpu-sharing", action="store_true",
                   help="allow more ranks than GPUs on a node")
    p.add_argument("--traceback", action="store_true")
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dptrain inspect",
                description="Show a checkpoint's format, metadata, progress and architecture, "
                            "and verify every checksum (exit 2 on a bad file).")
    p.add_argument("path", help="checkpoint or model file")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.add_argument("--traceback", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """Config file values, overridden by the options given on the command line."""
    values = load_toml(args.config) if args.config else {}
    for name in FIELDS:
        v = getattr(args, name, None)
        if v is None:
            continue
        if isinstance(v, str):
            if FIELDS[name].type in ("list", list) and name != "layers" and "[" not in v:
                v = "[" + v + "]"
            v = parse_value(name, v)
        values[name] = v
    return make_config(values)


# -- commands ------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, ctx: _Run) -> int:
    from .trainer import Trainer  # noqa: PLC0415  (keeps --help fast)

    cfg = config_from_args(args)
    if cfg.debug:
        from .dist.comm import launched_by_mpi, launcher_world_size  # noqa: PLC0415

        if launched_by_mpi() and launcher_world_size() > 1:
            raise UserError("--debug runs one process without MPI; start it without "
                            "mpiexec/srun (or with -n 1)")
        cfg.comm = "local"
    comm = ctx.communicator(cfg.comm)
    from .threads import limit_threads  # noqa: PLC0415

    threads, why = limit_threads(cfg.threads, comm.local_size)
    trainer = Trainer(cfg, comm)
    ctx.trainer = trainer
    try:
        ctx.agreed(trainer.setup)
        ctx.agreed(trainer.open_run_dir, root_only=True)
        trainer.resume_or_broadcast()
        trainer.say(f"BLAS threads per rank: {threads or 'as set'} ({why})")
        if cfg.debug:
            from .gradcheck import report_model_gradcheck  # noqa: PLC0415

            trainer.say(report_model_gradcheck(trainer))
        trainer.install_signal_handlers()
        ctx.in_loop = True
        return trainer.train()
    finally:
        trainer.close()


def cmd_eval(args: argparse.Namespace, ctx: _Run) -> int:
    from . import checkpoint as ckpt  # noqa: PLC0415
    from .backend import select_backend  # noqa: PLC0415
    from .data import load_dataset, validate_for_model  # noqa: PLC0415
    from .nn import Sequential, get_loss  # noqa: PLC0415
    from .trainer import evaluate_model  # noqa: PLC0415

    path = Path(args.checkpoint) if args.checkpoint else Path(args.run_dir) / "model.h5"
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, not {args.batch_size}")
    comm = ctx.communicator("auto")
    ck = ckpt.read_file(path)
    backend = select_backend(args.device, comm.local_rank, comm.local_size,
                             args.allow_gpu_sharing, comm=comm)
    model = Sequential.from_spec(ck.architecture, backend.xp)
    ckpt.check_compatible(ck, model, path)
    model.params[...] = backend.xp.asarray(ckpt.flatten(model, ck.params))
    model.state[...] = backend.xp.asarray(ckpt.flatten(model, ck.state, "state"))
    conf = ck.config
    data = load_dataset(args.dataset or conf.get("dataset", "digits"), dtype=model.dtype.name,
                        seed=conf.get("seed", 0),
                        synthetic_shape=tuple(conf.get("synthetic_shape", (28, 28, 1))),
                        synthetic_classes=conf.get("synthetic_classes", 10),
                        synthetic_samples=conf.get("synthetic_samples", 2048))
    loss_name = conf.get("loss", "cross_entropy")
    validate_for_model(data, model.input_shape, model.output_shape[0], loss_name)
    ds = data.test if args.split == "test" else data.train
    if ds is None or len(ds) == 0:
        raise UserError(f"dataset {data.name} has no {args.split} split")
    res = evaluate_model(model, get_loss(loss_name), ds, comm, backend.xp, args.batch_size)
    if comm.rank == 0:
        print(f"{path}: {args.split} loss {res['loss']:.4f} accuracy {res['accuracy']:.4f} "
              f"({res['samples']} samples, {data.name})")
    return 0


def cmd_inspect(args: argparse.Namespace, ctx: _Run) -> int:
    from . import checkpoint as ckpt  # noqa: PLC0415

    ck = ckpt.read_file(args.path, allow_nonfinite=True)  # HDF5 verifies each checksum
    nonfinite = ckpt.nonfinite_counts(ck)  # reported, then exit 2
    n_params = sum(a.size for a in ck.params.values())
    if args.json:
        trainer = {k: (None if isinstance(v, float) and v != v else v)  # NaN is not JSON
                   for k, v in vars(ck.trainer).items()}
        print(json.dumps({"meta": ck.meta, "trainer": trainer,
                          "architecture": ck.architecture, "params": int(n_params),
                          "checksums": {"sha256": "ok", "fletcher32_datasets": ck.datasets},
                          "nonfinite": nonfinite}, default=str, indent=2))
        return _inspect_verdict(args.path, nonfinite)
    m = ck.meta
    print(f"{args.path}: dptrain {ck.kind}, format version {m.get('format_version')}, "
          f"written by dptrain {m.get('dptrain_version')} on {m.get('created')}")
    print(f"  world size at save: {m.get('world_size')}, dtype {m.get('dtype')}, "
          f"{n_params:,} parameters")
    if ck.kind == "checkpoint":
        t = ck.trainer
        print(f"  progress: epoch {t.epoch} (+{t.epoch_pos} samples), step {t.global_step}, "
              f"{t.samples_seen:,} samples seen, best metric {t.best_metric:.4f}")
        print(f"  optimizer: {ck.optimizer_name}, step {ck.optimizer_step}, state "
              f"{', '.join(sorted(ck.optimizer_state)) or 'none'}")
    print(f"  input shape {tuple(ck.architecture.get('input_shape', []))}")
    counts: dict[str, int] = {}
    for (layer, _), a in ck.params.items():
        counts[layer] = counts.get(layer, 0) + a.size
    for i, spec in enumerate(ck.architecture.get("layers", [])):
        name = f"{i:02d}_{spec.get('type')}"
        opts = {k: v for k, v in spec.items() if k != "type"}
        print(f"  {name:<16} {json.dumps(opts):<60} {counts.get(name, 0):>10,}")
    print(f"  checksums: file SHA-256 ok, {ck.datasets} datasets with fletcher32 verified")
    return _inspect_verdict(args.path, nonfinite)


def _inspect_verdict(path: str, nonfinite: dict[str, int]) -> int:
    from .checkpoint import describe_nonfinite  # noqa: PLC0415

    if nonfinite:
        raise UserError(f"checkpoint {path} holds {describe_nonfinite(nonfinite)}")
    return 0


# -- running a command with the error policy ----------------------------------------
class _Run:
    """Holds the communicator and applies the error policy across ranks."""

    def __init__(self) -> None:
        self.comm: Any = None
        self.trainer: Any = None
        self.in_loop = False

    def communicator(self, kind: str) -> Any:
        from .dist.comm import make_communicator  # noqa: PLC0415

        self.comm = make_communicator(kind)
        return self.comm

    @property
    def rank(self) -> int:
        """This rank; before the communicator exists, the launcher's word for it (so a
        config mistake under mpiexec is printed by rank 0 alone, not once per rank)."""
        if self.comm is not None:
            return self.comm.rank
        from .dist.comm import launcher_rank  # noqa: PLC0415

        return launcher_rank()

    @property
    def world(self) -> int:
        return self.comm.size if self.comm is not None else 1

    def agreed(self, fn: Callable[[], None], root_only: bool = False) -> None:
        """Run ``fn`` (on every rank, or rank 0 alone); a UserError anywhere stops all."""
        err: UserError | None = None
        if not root_only or self.rank == 0:
            try:
                fn()
            except UserError as e:
                err = e
        if self.world == 1:
            if err is not None:
                raise err
            return
        failed = self.comm.allreduce_scalars([self.rank if err else self.world], "min")
        first = int(failed[0])
        if first == self.world:
            return
        msg = self.comm.bcast_bytes(str(err).encode() if err else None, root=first)
        raise agreed(UserError(msg.decode()))


def _print_error(run: _Run, e: BaseException, show_tb: bool, tagged: bool = False) -> None:
    if show_tb:
        traceback.print_exception(e)
    tag = f"[rank {run.rank}] " if tagged else ""
    print(f"{tag}dptrain: error: {e}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = "train"
    if argv and argv[0] in COMMANDS:
        cmd = argv.pop(0)
    if cmd == "train":  # before anything slow: a warning signal must not kill the set-up
        preempt.install()
    parser = {"train": train_parser, "eval": eval_parser, "inspect": inspect_parser}[cmd]()
    args = parser.parse_args(argv)
    run = _Run()
    handler = {"train": cmd_train, "eval": cmd_eval, "inspect": cmd_inspect}[cmd]
    from .trainer import StopTraining  # noqa: PLC0415

    try:
        return handler(args, run)
    except UserError as e:
        agreed = getattr(e, "agreed", False) or run.world == 1 or not run.in_loop
        if run.rank == 0 or not agreed:
            _print_error(run, e, args.traceback, tagged=not agreed)
        if not agreed:
            run.comm.abort(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    except StopTraining as e:
        if run.rank == 0:
            _print_error(run, e, args.traceback)
        return e.code
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly
        import os  # noqa: PLC0415

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if run.world > 1:
            run.comm.abort(130)
        return 130
    except Exception as e:  # a bug or a system failure: never leave other ranks hanging
        traceback.print_exception(e)
        tag = f"[rank {run.rank}] " if run.world > 1 else ""
        print(f"{tag}dptrain: internal error: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        if run.world > 1:
            run.comm.abort(EXIT_FAILURE)
        return EXIT_FAILURE
