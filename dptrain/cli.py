"""The command line: ``python -m dptrain [train|eval|inspect|predict|summary]``.

User mistakes print one line (rank 0 only) and exit with 2; ``--traceback`` shows the
stack. Any other exception on any rank prints there, tagged with the rank, and aborts the
whole MPI job so that no rank is left waiting in a collective.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import FIELDS, SECTIONS, Config, load_toml, make_config, parse_value
from .errors import EXIT_FAILURE, EXIT_USER_ERROR, StopTraining, UserError
from .parallel.launch import launched_by_mpi, launcher_rank, launcher_world_size

COMMANDS = ("train", "eval", "inspect", "predict", "summary")


def fail(message: str) -> NoReturn:
    """Report a user mistake in one line and exit with 2 (also used by scripts/). Under an
    MPI launcher only rank 0 prints: every rank makes the same mistake."""
    if launcher_rank() == 0:
        print(f"dptrain: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports mistakes in one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def _help(name: str) -> str:
    o = FIELDS[name]
    extra = f"; {o.range.text()}" if o.range is not None else ""
    return f"{o.help} (default: {o.shown_default()}{extra})".replace("%", "%%")


def train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dptrain [train]",
                      usage="python -m dptrain [train] [--config FILE] [OPTIONS]",
                      description="Train a model data-parallel over MPI ranks (or in one "
                                  "process). Other commands: `eval`, `inspect`, `predict`, "
                                  "`summary` (see `python -m dptrain eval --help`). Options "
                                  "override the config file; "
                                  "every option is also a config-file key (with underscores), "
                                  "at the top level or in its [section].")
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--traceback", action="store_true", help="show the stack on errors")
    p.add_argument("--version", action="version", version=f"dptrain {__version__}")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"[{section}]", (cls.__doc__ or "").strip())
        for name, o in FIELDS.items():
            if o.section != section:
                continue
            if o.kind is bool:
                group.add_argument(o.flag, dest=name, action=argparse.BooleanOptionalAction,
                                   default=None, help=_help(name))
                continue
            metavar = (o.metavar or ("{" + ",".join(o.choices) + "}" if o.choices else
                                     "JSON" if name == "layers" else "LIST" if o.kind is tuple
                                     else o.kind.__name__.upper()))
            group.add_argument(o.flag, dest=name, metavar=metavar, default=None,
                               help=_help(name))
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dptrain eval",
                      description="Evaluate a saved model or checkpoint (rebuilt from the file "
                                  "alone) on a dataset split; works under mpiexec too.")
    p.add_argument("--checkpoint", help="checkpoint or model file (default: RUN_DIR/model.h5)")
    p.add_argument("--run-dir", default="runs/default",
                   help="run directory (default: %(default)s)")
    p.add_argument("--dataset", help="dataset (default: the one in the file's config)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu")
    p.add_argument("--allow-gpu-sharing", action="store_true",
                   help="allow more ranks than GPUs on a node")
    p.add_argument("--confusion-png", metavar="PATH",
                   help="also draw the confusion matrix into this PNG (needs matplotlib)")
    p.add_argument("--traceback", action="store_true")
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dptrain inspect",
                      description="Show a checkpoint's format, metadata, progress and "
                                  "architecture, and verify every checksum (exit 2 on a bad "
                                  "file).")
    p.add_argument("path", help="checkpoint or model file")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.add_argument("--traceback", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """Config file values, overridden by the options given on the command line."""
    values = load_toml(args.config) if args.config else {}
    for name in FIELDS:
        v = getattr(args, name, None)
        if v is None:
            continue
        values[name] = parse_value(name, v) if isinstance(v, str) else v
    return make_config(values)


# -- commands ------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, run: _Run) -> int:
    from .threads import limit_threads  # noqa: PLC0415  (keeps --help fast)
    from .training import build_trainer  # noqa: PLC0415

    cfg = config_from_args(args)
    if cfg.run.debug:
        if launched_by_mpi() and launcher_world_size() > 1:
            raise UserError("--debug runs one process without MPI; start it without "
                            "mpiexec/srun (or with -n 1)")
        cfg = cfg.replace(comm="local")
    comm = run.communicator(cfg.parallel.comm)
    threads, why = limit_threads(cfg.parallel.threads, comm.local_size)
    trainer = build_trainer(cfg, comm,
                            threads_line=f"BLAS threads per rank: {threads or 'as set'} ({why})")
    run.in_loop = True
    return trainer.run()


def cmd_eval(args: argparse.Namespace, run: _Run) -> int:
    from . import checkpoint as ckpt  # noqa: PLC0415
    from .backend import select_backend  # noqa: PLC0415
    from .commands.eval_report import check_png_path, draw_confusion, report_lines  # noqa
    from .config import config_from_dict  # noqa: PLC0415
    from .nn import Sequential, get_loss  # noqa: PLC0415
    from .training import evaluate_model  # noqa: PLC0415
    from .training.inputs import eval_source  # noqa: PLC0415

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, not {args.batch_size}")
    if args.confusion_png:
        check_png_path(args.confusion_png)
    comm = run.communicator("auto")
    path = Path(args.checkpoint) if args.checkpoint else _model_of_run(Path(args.run_dir),
                                                                       comm.rank == 0)
    ck = ckpt.read_file(path)
    backend = select_backend(args.device, comm.local_rank, comm.local_size,
                             args.allow_gpu_sharing, comm=comm)
    model = Sequential.from_spec(ck.architecture, backend.xp)
    ckpt.load_into(model, ck, path)
    cfg = config_from_dict(ck.config)
    if args.dataset:
        cfg = cfg.replace(dataset=args.dataset)
    # decoded and normalised as in training (the statistics come from the file)
    source, name = eval_source(cfg, ck.data, args.split, model, -(-args.batch_size // comm.size))
    # classes: labels, or the targets of a cross-entropy (a regression has no classes)
    classes = len(model.output_shape) == 1 and model.output_shape[0] > 1 and (
        source.y.ndim == 1 or cfg.model.loss != "mse")
    try:
        res = evaluate_model(model, get_loss(cfg.model.loss), source, comm, backend.xp,
                             args.batch_size, confusion=classes)
    finally:
        source.close()
    if comm.rank == 0:
        head = f"{path}: {args.split}"
        print("\n".join(report_lines(res, head, name)))
        if args.confusion_png and classes:
            draw_confusion(res["confusion"], args.confusion_png,
                           f"{head} ({res['samples']} samples, {name})")
            print(f"confusion matrix drawn in {args.confusion_png}")
        elif args.confusion_png:
            print(f"note: {path} is a regression model: no confusion matrix to draw")
    return 0


def _model_of_run(run_dir: Path, say: bool) -> Path:
    """RUN_DIR/model.h5, or while the run is still going (or was stopped) its newest
    checkpoint, saying so."""
    from . import checkpoint as ckpt  # noqa: PLC0415

    model = run_dir / "model.h5"
    if model.is_file():
        return model
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir} has no model.h5 and no checkpoint yet (is it a run "
                        "directory? give --checkpoint PATH)")
    if say:
        print(f"note: {model} does not exist (yet): evaluating the newest checkpoint, "
              f"{found[0]}", flush=True)
    return found[0]


def cmd_inspect(args: argparse.Namespace, run: _Run) -> int:
    from . import checkpoint as ckpt  # noqa: PLC0415

    ck = ckpt.read_file(args.path, allow_nonfinite=True)  # HDF5 verifies each checksum
    nonfinite = ckpt.nonfinite_counts(ck)  # reported, then exit 2
    n_params = sum(a.size for a in ck.params.values())
    if args.json:
        def plain(v: Any) -> Any:  # NaN is not JSON
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return None if isinstance(v, float) and v != v else v

        trainer = plain(vars(ck.trainer))
        doc = {"meta": ck.meta, "trainer": trainer, "architecture": ck.architecture,
               "params": int(n_params),
               "checksums": {"sha256": "ok", "fletcher32_datasets": ck.datasets}}
        if ck.kind == "checkpoint":  # what the text form prints on its optimizer line
            doc["optimizer"] = {"name": ck.optimizer_name, "step": ck.optimizer_step,
                                "state": sorted(ck.optimizer_state)}
        doc["nonfinite"] = nonfinite
        print(json.dumps(doc, default=str, indent=2))
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
    from .nn import architecture_table  # noqa: PLC0415

    for line in architecture_table(ck.architecture):  # every layer, inside blocks too
        print(f"  {line}")
    print(f"  checksums: file SHA-256 ok, {ck.datasets} datasets with fletcher32 verified")
    return _inspect_verdict(args.path, nonfinite)


def _inspect_verdict(path: str, nonfinite: dict[str, int]) -> int:
    from .checkpoint import describe_nonfinite  # noqa: PLC0415

    if nonfinite:
        raise UserError(f"checkpoint {path} holds {describe_nonfinite(nonfinite)}")
    return 0


# -- running a command with the error policy ----------------------------------------
class _Run:
    """Holds the communicator and knows where the run is (for the error policy)."""

    def __init__(self) -> None:
        self.comm: Any = None
        self.in_loop = False  # past here, a UserError on one rank alone aborts the job

    def communicator(self, kind: str) -> Any:
        from .parallel import make_communicator  # noqa: PLC0415

        self.comm = make_communicator(kind)
        return self.comm

    @property
    def rank(self) -> int:
        """This rank; before the communicator exists, the launcher's word for it (so a
        config mistake under mpiexec is printed by rank 0 alone, not once per rank)."""
        return self.comm.rank if self.comm is not None else launcher_rank()

    @property
    def world(self) -> int:
        return self.comm.size if self.comm is not None else 1


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
    if cmd == "train":  # a stop signal during start-up is recorded, never fatal
        from . import signals  # noqa: PLC0415

        signals.install()
    from .commands.predict import cmd_predict, predict_parser  # noqa: PLC0415
    from .commands.summary import cmd_summary, summary_parser  # noqa: PLC0415

    parser = {"train": train_parser, "eval": eval_parser, "inspect": inspect_parser,
              "predict": lambda: predict_parser(OneLineParser),
              "summary": lambda: summary_parser(train_parser)}[cmd]()
    args = parser.parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "inspect": cmd_inspect,
               "predict": cmd_predict, "summary": cmd_summary}[cmd]
    return run_command(handler, args)


def run_command(handler: Any, args: argparse.Namespace) -> int:
    """``handler(args, run)`` under the error policy: a user mistake is one line and exit 2
    (printed once, every rank exiting together); any other failure aborts the whole job."""
    run = _Run()
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
