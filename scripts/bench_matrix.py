"""Run scripts/bench.py over models and layouts (ranks x BLAS threads per rank), and report
them against another system's figures and dptrain's targets.

    python scripts/bench_matrix.py --repeat 5 --out bench.md --plot bench.png
    python scripts/bench_matrix.py --models mlp --layouts 1x1,2x1 --json-out bench.jsonl

Each (model, layout) runs in its own process, under mpiexec for several ranks; with
``--repeat``, round after round over all of them, keeping each layout's fastest run. It
prints a Markdown table, the 2-rank ratios paired in time, the reference figures and the
target table, read from ``--reference`` (a data file that says which machine and software
its figures came from; see scripts/bench_reference.py), and with ``--plot`` draws a bar
chart (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_options, bench_reference
try:
    import dptrain  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_options import add_run_options, count, image_shape, positive, run_argv, shape_text
from bench_reference import (
    Figure,
    Layout,
    Reference,
    Target,
    layout_text,
    load_reference,
    parse_layout,
    samples,
)

from dptrain.cli import OneLineParser, fail
from dptrain.errors import UserError
from dptrain.nn import PRESETS
from dptrain.training.meter import PHASES

HERE = Path(__file__).resolve().parent
BENCH = HERE / "bench.py"
REFERENCE = HERE / "reference" / "pytorch-2.13-cpu.json"
DEFAULT_SHAPE = (28, 28, 1)
Key = tuple[str, int, int]  # (model, ranks, threads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python scripts/bench_matrix.py",
                      description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,cnn", help="model presets, comma-separated")
    p.add_argument("--layouts", default="1x1,1x2,2x1",
                   help="RANKSxTHREADS,... (threads: BLAS threads per rank)")
    p.add_argument("--shape", type=image_shape, default=None, metavar="H,W,C",
                   help="every model's synthetic input (default: the shape of the model's "
                        f"reference figures, else {shape_text(DEFAULT_SHAPE)})")
    add_run_options(p)
    p.add_argument("--paired-scaling", type=count, default=10, metavar="ROUNDS",
                   help="in the runs of several ranks: alternating blocks of 10 steps of "
                        "every rank and of rank 0 alone (0: skip)")
    p.add_argument("--repeat", type=positive, default=1,
                   help="runs per layout; the fastest is kept (for a machine shared with "
                        "other work, where the fastest run is the least disturbed)")
    p.add_argument("--timeout", type=positive, default=900, help="seconds per run")
    p.add_argument("--reference", default=str(REFERENCE),
                   help="the other system's figures and the targets (JSON; default: "
                        "scripts/reference/pytorch-2.13-cpu.json)")
    p.add_argument("--out", default="", help="also write the Markdown report to this file")
    p.add_argument("--json-out", default="", help="also write the records (JSON lines)")
    p.add_argument("--plot", default="", help="bar chart of the matrix (PNG, matplotlib)")
    return p.parse_args(argv)


# -- running ------------------------------------------------------------------------------
def mpiexec() -> str:
    """The mpiexec of this Python's environment (PyPI mpich), else one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise UserError("layouts of several ranks need mpiexec (pip install mpich)")
    return found


def cases_of(args: argparse.Namespace) -> list[Key]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in PRESETS:
            raise UserError(f"--models: unknown model {m!r}; known: {', '.join(PRESETS)}")
    try:
        layouts = [parse_layout(part) for part in args.layouts.split(",")]
    except UserError as e:
        raise UserError(f"--layouts: {e}") from None
    return [(model, ranks, threads) for model in models for ranks, threads in layouts]


def bench_command(args: argparse.Namespace, case: Key, shape: tuple[int, ...],
                  launcher: str) -> list[str]:
    model, ranks, threads = case
    cmd = [sys.executable, str(BENCH), "--model", model, "--shape", shape_text(shape),
           "--threads", str(threads), "--gemm-bound", *run_argv(args)]
    if ranks > 1:
        cmd = [launcher, "-n", str(ranks), *cmd, "--paired-scaling", str(args.paired_scaling)]
    return cmd


def run_child(cmd: list[str], env: dict[str, str], what: str, timeout: int) -> dict[str, Any]:
    """One benchmark process (or mpiexec job); its JSON record."""
    print(f"bench: {what} (ranks x threads) ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"dptrain: error: {what} took more than {timeout} s", file=sys.stderr)
        raise SystemExit(1) from None
    lines = [s for s in proc.stdout.splitlines() if s.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        print(f"dptrain: error: {what} failed (exit {proc.returncode})", file=sys.stderr)
        raise SystemExit(1)
    return json.loads(lines[-1])


def run_matrix(args: argparse.Namespace, ref: Reference) -> list[dict[str, Any]]:
    """Each (model, layout) in its own process (or mpiexec job), one after another; with
    ``--repeat``, round after round over all of them (so that every layout sees the same
    spells of other work on the machine), keeping each layout's fastest run."""
    cases = cases_of(args)
    launcher = mpiexec() if any(ranks > 1 for _, ranks, _ in cases) else ""
    runs: dict[Key, list[dict[str, Any]]] = {c: [] for c in cases}
    for _ in range(args.repeat):
        for case in cases:
            model, ranks, threads = case
            shape = args.shape or ref.input_shape(model) or DEFAULT_SHAPE
            env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                       OPENBLAS_NUM_THREADS=str(threads))
            runs[case].append(run_child(bench_command(args, case, shape, launcher), env,
                                        f"{model} {ranks}x{threads}", args.timeout))
    records = []
    for case in cases:
        best = max(runs[case], key=lambda r: r["samples_per_sec"])
        best["repeats"] = args.repeat
        best["samples_per_sec_all_runs"] = [r["samples_per_sec"] for r in runs[case]]
        for key in ("paired_scaling", "paired_scaling_balanced"):
            values = [r[key] for r in runs[case] if key in r]
            if values:
                best[f"{key}_all_runs"] = values
        records.append(best)
    return records


# -- the report ---------------------------------------------------------------------------
def key_of(r: dict[str, Any]) -> Key:
    return r["model"], r["world_size"], r["threads_per_rank"]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _num(x: float) -> str:
    """1.4 -> "1.4", 1.0 -> "1.0", 1.25 -> "1.25"."""
    s = f"{x:g}"
    return s if "." in s or "e" in s else f"{x:.1f}"


def mismatch(rec: dict[str, Any], fig: Figure) -> str:
    """Why ``rec`` cannot be set against ``fig`` (its workload differs), or ""."""
    w = fig.taken.workload
    if tuple(rec["input_shape"]) != fig.taken.input_shape:
        return (f"inputs {shape_text(rec['input_shape'])} here, "
                f"{shape_text(fig.taken.input_shape)} there")
    if rec["batch_per_rank"] != w["batch_per_rank"]:
        return f"batch {rec['batch_per_rank']} per rank here, {w['batch_per_rank']} there"
    if "dtype" in w and rec["dtype"] != w["dtype"]:
        return f"{rec['dtype']} here, {w['dtype']} there"
    return ""


def comparable_figure(ref: Reference, rec: dict[str, Any]) -> Figure | None:
    fig = ref.figure(rec["model"], key_of(rec)[1:])
    return fig if fig is not None and not mismatch(rec, fig) else None


def table_rows(records: list[dict[str, Any]], ref: Reference) -> list[str]:
    by = {key_of(r): r for r in records}
    head = (f"| model | ranks x threads | samples/s | vs {ref.short_name} | vs 1x1 | samples/s "
            "at p10 step (vs 1x1) | step ms p10 / p50 / p90 | data / fwd / bwd / sync wait / "
            "opt ms | allreduce raw / in step ms | GEMM bound samples/s (ratio) | peak RSS MB |")
    lines = [head, "|" + "---|" * 11]
    for r in records:
        one = by.get((r["model"], 1, 1))
        fig = comparable_figure(ref, r)
        bound = r.get("gemm_bound_samples_per_sec")
        lines.append(
            f"| {r['model']} | {r['world_size']} x {r['threads_per_rank']} | "
            f"{r['samples_per_sec']:,.0f} | "
            f"{_ratio(r['samples_per_sec'], fig.high if fig else None)} | "
            f"{_ratio(r['samples_per_sec'], one['samples_per_sec'] if one else None)} | "
            f"{r['samples_per_sec_p10']:,.0f} ("
            f"{_ratio(r['samples_per_sec_p10'], one['samples_per_sec_p10'] if one else None)})"
            f" | {r['step_time_ms_p10']:.2f} / {r['step_time_ms']:.2f} / "
            f"{r['step_time_ms_p90']:.2f} | "
            f"{r['data_ms']:.2f} / {r['forward_ms']:.2f} / {r['backward_ms']:.2f} / "
            f"{r['sync_wait_ms']:.2f} / {r['optimizer_ms']:.2f} | "
            + (f"{r['allreduce_ms_standalone']:.2f} / {r['allreduce_ms_in_step']:.2f} | "
               if r["world_size"] > 1 else "- | ")
            + (f"{bound:,.0f} ({r['gemm_bound_ratio']:.2f}) | " if bound else "- | ")
            + f"{r['peak_rss_mb']:.0f} |")
    return lines


def ratio_list(per_model: list[tuple[str, list[float]]]) -> str:
    """"mlp: 1.80x, 1.75x (median 1.78x); cnn: ..." """
    return "; ".join(f"{m}: " + ", ".join(f"{v:.2f}x" for v in rs)
                     + f" (median {float(np.median(rs)):.2f}x)" for m, rs in per_model)


def multi_rank_layouts(by: dict[Key, dict[str, Any]]) -> list[Layout]:
    return sorted({(n, t) for _, n, t in by if n > 1})


def per_round_ratios(by: dict[Key, dict[str, Any]], layout: Layout
                     ) -> list[tuple[str, list[float]]]:
    """Each model's throughput at ``layout`` over 1x1 within each ``--repeat`` round."""
    out = []
    for (model, n, t), many in by.items():
        one = by.get((model, 1, 1))
        if (n, t) == layout and one:
            a, b = many["samples_per_sec_all_runs"], one["samples_per_sec_all_runs"]
            if len(a) == len(b) > 1:
                out.append((model, [x / y for x, y in zip(a, b, strict=True)]))
    return out


def in_job_ratios(by: dict[Key, dict[str, Any]], layout: Layout, key: str
                  ) -> list[tuple[str, list[float]]]:
    """Each model's per-run values of ``key`` (a paired scaling) at ``layout``."""
    return [(m, r[key]) for (m, n, t), r in by.items() if (n, t) == layout and r.get(key)]


def paired_scaling_medians(by: dict[Key, dict[str, Any]]) -> dict[Key, float]:
    """Scaling paired in time per (model, layout of several ranks): the median of the
    ratios within each run, else the median of the per-round ratios."""
    out: dict[Key, float] = {}
    for layout in multi_rank_layouts(by):
        for m, rs in per_round_ratios(by, layout):
            out[(m, *layout)] = float(np.median(rs))
        if layout[1] == 1:  # rank 0 alone ran 1 thread: a ratio over 1x1
            for m, rs in in_job_ratios(by, layout, "paired_scaling_all_runs"):
                out[(m, *layout)] = float(np.median(rs))
    return out


def ratio_lines(by: dict[Key, dict[str, Any]]) -> list[str]:
    lines = []
    for layout in multi_rank_layouts(by):
        name, solo = layout_text(layout), f"1x{layout[1]}"
        rounds = per_round_ratios(by, layout)
        if rounds:
            lines += ["", f"{name} / 1x1 within each round (a round runs every layout once, "
                      "back to back, so a slow spell of the machine tends to hit both runs "
                      "of a ratio): " + ratio_list(rounds)]
        in_job = in_job_ratios(by, layout, "paired_scaling_all_runs")
        if in_job:
            lines += ["", f"{name} / {solo} within each {name} run (its ranks train "
                      "together and rank 0 trains alone, in alternating blocks of 10 "
                      "steps): " + ratio_list(in_job)]
        balanced = in_job_ratios(by, layout, "paired_scaling_balanced_all_runs")
        if balanced:
            lines += ["", f"The same for {name} if the ranks had done equal work each step "
                      "(each rank's step less its wait for the gradient sum, averaged over "
                      "the ranks; what is left below the rank count is the ranks slowing "
                      "each other down and the sum itself): " + ratio_list(balanced)]
    return lines


def reference_lines(ref: Reference, models: set[str]) -> list[str]:
    """The reference figures of each machine that measured one of ``models``."""
    lines = []
    for group in ref.groups():
        figs = [f for f in ref.figures.values() if f.taken is group]
        if not any(f.model in models for f in figs):
            continue
        lines += ["", f"{ref.system} samples/s {group.describe()}: "
                  + ", ".join(f"{f.model} {layout_text(f.layout)} {f.text()}" for f in figs)]
    return lines


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "no")


def judge(t: Target, by: dict[Key, dict[str, Any]], ref: Reference,
          paired: dict[Key, float]) -> list[str] | None:
    """The target table's row for ``t``: label, then (measured, met) at the wall clock,
    at the p10 step time and paired in time; None when the layout was not run."""
    rec = by.get((t.model, *t.layout))
    name, sign = f"{t.model} {layout_text(t.layout)}", ">=" if t.at_least else "<="
    if rec is None:
        return None
    cols: list[tuple[str, bool | None]] = []
    if t.metric == "vs_reference":
        fig = ref.figure(t.model, t.layout)
        assert fig is not None  # load_reference checked it
        label = (f"{name} {sign} {_num(t.limit)}x {ref.short_name} "
                 f"({samples(t.limit * fig.high)} samples/s)")
        why = mismatch(rec, fig)
        for key in ("samples_per_sec", "samples_per_sec_p10"):
            v = rec[key]
            cols.append((f"not comparable: {why}", None) if why else
                        (f"{v:,.0f} ({v / fig.high:.2f}x)", t.met(v / fig.high)))
        cols.append(("-", None))
    elif t.metric in ("gemm_bound", "gemm_bound_3x_forward"):
        three = t.metric == "gemm_bound_3x_forward"
        label = (f"{name} {sign} {t.limit:.0%} of the GEMM-alone bound "
                 + ("(3 x forward FLOPs)" if three else "(the products the step performs)"))
        b = rec.get("gemm_bound_3x_forward_samples_per_sec" if three
                    else "gemm_bound_samples_per_sec")
        if not b:
            return None
        for key in ("samples_per_sec", "samples_per_sec_p10"):
            cols.append((f"{rec[key] / b:.0%} of {b:,.0f}", t.met(rec[key] / b)))
        q = rec.get("paired_gemm_bound_3x_forward_ratio" if three
                    else "paired_gemm_bound_ratio")
        cols.append((f"{q:.0%}", t.met(q)) if q else ("-", None))
    elif t.metric == "scaling":
        label = f"{name} / 1x1 {sign} {_num(t.limit)}x"
        one = by.get((t.model, 1, 1))
        if one is None:
            return None
        for key in ("samples_per_sec", "samples_per_sec_p10"):
            s = rec[key] / one[key]
            cols.append((f"{s:.2f}x", t.met(s)))
        q = paired.get((t.model, *t.layout))
        cols.append((f"{q:.3f}x", t.met(q)) if q is not None else ("-", None))
    else:  # sync_per_allreduce
        label = f"{name} sync per step {sign} {_num(t.limit)}x one raw allreduce"
        raw, in_step = rec["allreduce_ms_standalone"], rec["allreduce_ms_in_step"]
        if not raw:
            return None
        q = in_step / raw
        cols += [(f"{in_step:.2f} ms / {raw:.2f} ms = {q:.2f}x", t.met(q))] * 2
        cols.append(("-", None))
    return [label] + [s for text, ok in cols for s in (text, _verdict(ok))]


def target_lines(by: dict[Key, dict[str, Any]], ref: Reference) -> list[str]:
    paired = paired_scaling_medians(by)
    rows = [row for t in ref.targets if (row := judge(t, by, ref, paired)) is not None]
    if not rows:
        return []
    return ["", "| target | measured (wall clock) | met | at the p10 step time | met "
            "| paired in time | met |", "|---|---|---|---|---|---|---|",
            *("| " + " | ".join(row) + " |" for row in rows),
            "", "Paired in time: a scaling ratio is the median over the runs of several "
            "ranks of the ratio within each run (--paired-scaling; throughput from the mean "
            "step times of its blocks), or without those, the median of the per-round "
            "ratios; the GEMM bound is the median GEMM set over the median step, from "
            "alternating blocks of 10 steps and 10 GEMM sets in the same process "
            "(--gemm-rounds)."]


def markdown(records: list[dict[str, Any]], ref: Reference) -> str:
    """The matrix as a Markdown table, the ratios paired in time, the reference figures,
    then the targets, each met or not."""
    by = {key_of(r): r for r in records}
    lines = table_rows(records, ref)
    if any(len(r.get("samples_per_sec_all_runs", [])) > 1 for r in records):
        lines += ["", "Every run (samples/s, the fastest is in the table): " + "; ".join(
            f"{r['model']} {r['world_size']}x{r['threads_per_rank']}: "
            + ", ".join(f"{v:,.0f}" for v in r["samples_per_sec_all_runs"]) for r in records)]
    lines += ratio_lines(by)
    lines += reference_lines(ref, {r["model"] for r in records})
    lines += target_lines(by, ref)
    first = records[0] if records else {}
    shapes = ", ".join(dict.fromkeys(
        f"{r['model']} {shape_text(r['input_shape'])}" for r in records))
    lines += ["", f"BLAS: {first.get('blas', '?')}; environment: "
              f"{first.get('blas_env') or 'no OpenBLAS/OMP variables set'}; "
              f"{first.get('steps')} timed steps after {first.get('warmup')} warm-up steps, "
              f"batch {first.get('batch_per_rank')} per rank, {first.get('dtype')}; "
              f"inputs {shapes}; fastest of {first.get('repeats', 1)} run(s) per layout."]
    return "\n".join(lines) + "\n"


# -- the plot -----------------------------------------------------------------------------
def pyplot() -> Any:
    """matplotlib.pyplot drawing into files, or a UserError saying how to install it."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'dptrain[plot]'") from None
    return plt


def plot(records: list[dict[str, Any]], ref: Reference, path: str) -> None:
    """Samples/s next to the reference system's (top) and the per-step time breakdown
    (bottom), one column per model."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    colors = {"data": "#8c8c8c", "forward": "#4c72b0", "backward": "#dd8452",
              "sync_wait": "#c44e52", "optimizer": "#55a868"}
    for col, model in enumerate(models):
        rs = [r for r in records if r["model"] == model]
        labels = [f"{r['world_size']} rank{'s' if r['world_size'] > 1 else ''} x "
                  f"{r['threads_per_rank']} thread{'s' if r['threads_per_rank'] > 1 else ''}"
                  for r in rs]
        x = np.arange(len(rs))
        ax = axes[0][col]
        ours = [r["samples_per_sec"] for r in rs]
        figs = [comparable_figure(ref, r) for r in rs]
        shift, width = (0.2, 0.4) if any(figs) else (0.0, 0.6)
        b1 = ax.bar(x - shift, ours, width, label="dptrain", color="#4c72b0")
        ax.bar_label(b1, labels=[f"{v:,.0f}" for v in ours], fontsize=8)
        if any(figs):
            top = [f.high if f else 0 for f in figs]
            spread = [f.high - f.low if f else 0 for f in figs]
            taken = next(f.taken for f in figs if f)
            ax.bar(x + 0.2, top, 0.4, label=f"{ref.system}, {taken.machine_short}",
                   color="#bbbbbb")
            ranged = [i for i, d in enumerate(spread) if d > 0]  # the reference's spread
            if ranged:
                ax.errorbar(x[ranged] + 0.2, [top[i] for i in ranged], capsize=3, fmt="none",
                            yerr=[[spread[i] for i in ranged], [0] * len(ranged)], color="k")
        else:
            top = []
        ax.set_xticks(x, labels)
        ax.set_ylabel("samples / s (global)")
        ax.set_title(f"{model} ({shape_text(rs[0]['input_shape'])}): "
                     f"throughput, batch {rs[0]['batch_per_rank']} per rank")
        ax.set_ylim(0, 1.25 * max(ours + top))
        ax.legend(loc="upper left", fontsize=8, ncol=2)
        ax = axes[1][col]
        bottom = np.zeros(len(rs))
        for phase in PHASES:
            vals = np.array([r[f"{phase}_ms"] for r in rs])
            ax.bar(x, vals, 0.6, bottom=bottom, label=phase.replace("_", " "),
                   color=colors[phase])
            bottom += vals
        ax.set_xticks(x, labels)
        ax.set_ylabel("ms per step (slowest rank, mean)")
        ax.set_title(f"{model}: where a step's time goes")
        ax.set_ylim(0, 1.3 * max(bottom))
        ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before the first run, outputs that could not be written after the last."""
    for flag in ("out", "json_out", "plot"):
        path = getattr(args, flag)
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"--{flag.replace('_', '-')}: the directory of {path} does not "
                            "exist")
        if path and Path(path).is_dir():
            raise UserError(f"--{flag.replace('_', '-')}: {path} is a directory")
    if args.plot:
        pyplot()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ref = load_reference(args.reference)
        cases_of(args)  # mistakes in the options before anything runs
        check_outputs(args)
        records = run_matrix(args, ref)
        table = markdown(records, ref)
        print(table, end="")
        if args.out:
            Path(args.out).write_text(table)
        if args.json_out:
            Path(args.json_out).write_text("".join(json.dumps(r) + "\n" for r in records))
        if args.plot:
            plot(records, ref, args.plot)
    except UserError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
