"""A run's inputs: the dataset held in memory (one copy per node) or streamed, the batch
transform, the step's source, evaluation's source, and the record a run keeps of its data.

``open_inputs`` follows the [data] section. The dataset is found and checked on every
rank (under ``agree``, before any collective); then the ranks choose the loader together
(``auto`` takes the smallest memory figure of any rank, so they cannot disagree), and in
memory mode allocate one copy per node in shared memory (falling back to a copy per rank
where /dev/shm is too small), which the node's first rank fills.

``settle`` completes the inputs once a resume is known: the normalisation statistics are
the checkpoint's, or, in a fresh run, computed by rank 0 from the training split (float64,
streamed in chunks) and broadcast as JSON, so every rank normalises with the same bytes.
The record (statistics, augmentation, dataset fingerprint) goes into data.json of the run
directory, every checkpoint and model.h5; ``check_resume`` compares the fingerprint of the
files with the checkpoint's before anything on disk changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data import fingerprint as fp
from ..data.augment import AugmentSpec
from ..data.choice import choose_loader, mem_available
from ..data.datasets import Dataset
from ..data.node_copy import private_alloc
from ..data.normalize import ChannelStats, stats_of_rows
from ..data.source import RowSource
from ..data.stored import (
    FoundData,
    StoredSplit,
    find_data,
    memory_layout,
    memory_splits,
    stream_splits,
)
from ..data.transform import BatchTransform
from ..data.upload import DeviceBatches
from ..data.worker import ProcessSource
from ..errors import UserError
from ..parallel import Communicator, agree
from ..parallel.shared import NodeArrays, shm_shortfall

#: the run directory's record of its data, beside config.json
RECORD_NAME = "data.json"


def augment_spec(cfg: Config) -> AugmentSpec | None:
    """The [data] section's augmentation (None when all of it is off)."""
    d = cfg.data
    spec = AugmentSpec(crop_padding=d.augment_crop, flip=d.augment_flip,
                       erase_prob=d.augment_erase, erase_area=tuple(d.augment_erase_area),
                       erase_ratio=tuple(d.augment_erase_ratio))
    return spec if spec.active else None


def check_augment(cfg: Config, found: FoundData) -> None:
    """Image augmentation needs (H, W, C) samples."""
    if augment_spec(cfg) is not None and len(found.train.sample_shape) != 3:
        raise UserError(f"augmentation (augment_crop, augment_flip, augment_erase) needs image "
                        f"samples (height, width, channels); dataset {found.name!r} has "
                        f"samples of shape {found.train.sample_shape}")


class PendingStats:
    """Stands for statistics that ``settle`` has not computed yet: a batch normalised
    before ``Trainer.prepare()`` (or ``run()``) would be normalised wrongly, so it raises."""

    def _refuse(self, *args: object) -> Any:
        raise RuntimeError("normalisation statistics are not settled yet: call "
                           "trainer.prepare() (trainer.run() does) before the first step")

    apply = to_dict = _refuse


class TrainingInputs:
    """The data side of a trainer (``trainer.data``)."""

    def __init__(self, cfg: Config, found: FoundData, transform: BatchTransform, source: Any,
                 test_source: Any, lines: list[str]) -> None:
        self.cfg, self.found, self.transform = cfg, found, transform
        #: what the step calls (on the device where the run computes)
        self.source = source
        #: the test split's source for evaluation (decoded and normalised, never augmented)
        self.test_source = test_source
        self.lines = lines
        self.stats: ChannelStats | None = None
        self.fingerprint: dict[str, Any] | None = None
        self.settled = False

    @property
    def name(self) -> str:
        return self.found.name

    @property
    def train(self) -> StoredSplit:
        return self.found.train

    @property
    def test(self) -> StoredSplit | None:
        return self.found.test

    @property
    def num_classes(self) -> int | None:
        return self.found.num_classes

    def splits(self) -> list[StoredSplit]:
        return self.found.splits()

    # -- the record of a run's data --------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """Plain JSON values: what normalised, augmented and fingerprinted the data."""
        spec = augment_spec(self.cfg)
        return {"dataset": self.found.name,
                "normalize": None if self.stats is None else self.stats.to_dict(),
                "augment": None if spec is None else spec.to_dict(),
                "fingerprint": self.fingerprint}

    def saved_record(self) -> dict[str, Any]:
        """The record for checkpoints and model.h5: {} when there is nothing to keep (no
        statistics, no augmentation, no files: the built-in digits), so that such files
        keep the layout of earlier versions."""
        rec = self.record()
        return rec if any(rec[k] is not None for k in ("normalize", "augment",
                                                        "fingerprint")) else {}

    def _current_fingerprint(self) -> dict[str, Any] | None:
        if self.fingerprint is None and self.found.files:
            self.fingerprint = fp.fingerprint(self.found.files)
        return self.fingerprint

    def check_resume(self, recorded: dict[str, Any], path: Path, allow: bool) -> str:
        """Rank 0, before the run directory is touched: the dataset must be the one the
        checkpoint was trained on. Returns a warning where it changed but ``allow``."""
        old = recorded.get("fingerprint")
        if not old or not self.found.files:
            return ""
        new = self._current_fingerprint()
        assert new is not None
        diff = fp.compare(old, new)
        if not diff:
            return ""
        where = os.path.commonpath([str(p.resolve()) for p in self.found.files])
        if allow:
            return f"warning: the dataset at {where} changed since {path} was written: {diff}"
        raise UserError(f"the dataset at {where} changed since checkpoint {path} was written: "
                        f"{diff}; resume on the data it was trained on, or pass "
                        "--allow-config-change to go on with this data")

    def _settle_root(self, recorded: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0: statistics (the checkpoint's, or computed now) and the fingerprint."""
        stats = None
        if self.cfg.data.normalize == "channel":
            saved = (recorded or {}).get("normalize")
            if saved:
                stats = ChannelStats.from_dict(saved)
            else:
                train = self.found.train
                stats = stats_of_rows(train.read_range, len(train))
                bad = [v for v in stats.mean + stats.std if not np.isfinite(v)]
                if bad:
                    raise UserError(f"dataset {self.found.name!r}: the training split holds "
                                    "NaN/Inf values; its statistics cannot be computed")
        self.stats = stats
        self._current_fingerprint()
        return self.record()

    def settle(self, comm: Communicator, recorded: dict[str, Any] | None) -> None:
        """Every rank: the statistics and fingerprint rank 0 settled (from ``recorded``,
        a checkpoint's data record, or computed now), before the first batch."""
        rec = agree(comm, lambda: self._settle_root(recorded), root_only=True)
        doc = json.dumps(rec).encode() if comm.rank == 0 else None
        if comm.size > 1:
            doc = comm.bcast_bytes(doc)
        assert doc is not None
        got = json.loads(doc)
        self.stats = None if got["normalize"] is None else ChannelStats.from_dict(
            got["normalize"])
        self.fingerprint = got["fingerprint"]
        self.transform.stats = self.stats
        self.settled = True

    def write_record(self, run_dir: Path) -> None:
        """data.json in the run directory (rank 0), written whole or not at all."""
        tmp = run_dir / f".{RECORD_NAME}.tmp"
        tmp.write_text(json.dumps(self.record(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, run_dir / RECORD_NAME)

    def describe(self) -> str:
        """The start lines about the data."""
        out = list(self.lines)
        if self.stats is not None:
            mean = ", ".join(f"{v:.4g}" for v in self.stats.mean)
            std = ", ".join(f"{v:.4g}" for v in self.stats.std)
            out.append(f"normalize channel: mean {mean}, std {std} (from "
                       f"{self.stats.count:,} training samples)")
        return "\n".join(out)

    def head(self, n: int) -> Dataset:
        """The first ``n`` training samples as the model sees them unaugmented."""
        rows = np.arange(min(n, len(self.train)), dtype=np.int64)
        raw = self.train.read_range(0, len(rows))
        x = self.transform(np.ascontiguousarray(raw), rows, 0, training=False)
        return Dataset(x, self.train.y[rows], self.train.name)

    def close(self) -> None:
        """Stop the sources' background work and close the files (idempotent)."""
        for s in (self.source, self.test_source):
            if s is not None:
                s.close()
        self.found.close()


# -- building them ---------------------------------------------------------------------------
def _min_available(comm: Communicator) -> tuple[int | None, str]:
    avail, where = mem_available()
    low = float(comm.allreduce_scalars([float(avail if avail is not None else -1)], "min")[0]
                ) if comm.size > 1 else float(avail if avail is not None else -1)
    if low < 0:
        return None, ""
    return int(low), where + (", the lowest of any rank" if comm.size > 1 else "")


def _hold(cfg: Config, found: FoundData, comm: Communicator, lines: list[str]) -> tuple[
        FoundData, str]:
    """Memory (shared per node where possible) or stream; the start line says which."""
    want = cfg.data.loader
    if not found.streamable:
        if want == "stream":
            stream_splits(found)  # raises: nothing to stream
        lines.append(f"data: {found.name} in memory (loader {want}: the data is not an HDF5 "
                     "file, it is loaded whole)")
        return found, "memory"
    # every decision below is the same on every rank: the collectives depend on it
    shared = False
    short = ""
    if want != "stream" and NodeArrays.applies(comm):
        short = shm_shortfall(comm, found.nbytes)
        shared = not short
    most_here = int(comm.allreduce_scalars([comm.local_size], "max")[0]) if comm.size > 1 \
        else 1
    copies = 1 if shared else most_here
    mode, why = want, f"loader {want}"
    if want == "auto":
        avail, where = _min_available(comm)
        choice = choose_loader(found.nbytes, copies, avail, where)
        mode, why = choice.mode, choice.reason
    if mode == "stream":
        lines.append(f"data: {found.name} streamed from {found.source} ({why})")
        return stream_splits(found), "stream"
    if shared:
        node = NodeArrays(comm)  # type: ignore[arg-type]
        buffers = iter([node.alloc(shape, dt) for shape, dt in memory_layout(found)])
        held = agree(comm, lambda: memory_splits(found, lambda s, d: next(buffers),
                                                 node.fill))
        node.fence()
        where = "one copy per node in shared memory"
    else:
        held = agree(comm, lambda: memory_splits(found, private_alloc, True))
        where = "one copy per rank" + (f" ({short})" if short else "")
    assert held is not None
    lines.append(f"data: {found.name} in memory, {where}, {found.nbytes / 2**20:,.1f} MiB "
                 f"stored ({why})")
    return held, "memory"


def _prefetch_mode(cfg: Config, found: FoundData, mode: str, lines: list[str]) -> str:
    want = cfg.data.prefetch
    decoding = mode == "stream" and not all(found.train.reader.direct)
    if want == "auto":
        return "process" if decoding else "thread"
    if want == "process" and mode != "stream":
        lines.append("note: prefetch process streams from the files in a worker; the data is "
                     "in memory, so a thread prepares the batches")
        return "thread"
    return want


def open_inputs(cfg: Config, found: FoundData, comm: Communicator, backend: Any,
                micro_batch: int) -> TrainingInputs:
    """The inputs of a run over ``found`` (collective: every rank calls it)."""
    lines: list[str] = []
    found, mode = _hold(cfg, found, comm, lines)
    prefetch = _prefetch_mode(cfg, found, mode, lines)
    if mode == "stream":
        warn = found.train.reader.layout_warning()
        if warn:
            lines.append(f"note: {warn}")
    spec = augment_spec(cfg)
    transform = BatchTransform(cfg.model.dtype, spec, None, cfg.run.seed)
    if cfg.data.normalize == "channel":
        transform.stats = PendingStats()  # type: ignore[assignment]
    rows = -(-micro_batch // comm.size)
    train = found.train
    if prefetch == "process":
        assert found.source is not None
        host: Any = ProcessSource(found.source, transform, rows)
    else:
        host = RowSource(train.reader, train.y, transform, rows, training=True,
                         background=prefetch == "thread" and not backend.is_gpu)
    source = DeviceBatches(backend, host, rows, asynchronous=prefetch != "off") \
        if backend.is_gpu else host
    test = None
    if found.test is not None and len(found.test):
        eval_rows = -(-cfg.schedule.eval_batch_size // comm.size)
        test = RowSource(found.test.reader, found.test.y, transform, eval_rows,
                         training=False, background=prefetch != "off")
    aug = "off" if spec is None else ", ".join(
        [f"crop {spec.crop_padding}"] * bool(spec.crop_padding) + ["flip"] * spec.flip
        + [f"erase {spec.erase_prob:g}"] * bool(spec.erase_prob > 0))
    lines.append(f"data: prefetch {prefetch}, augment {aug}, normalize {cfg.data.normalize}")
    return TrainingInputs(cfg, found, transform, source, test, lines)


def eval_source(cfg: Config, record: dict[str, Any], split: str, model: Any, rows: int
                ) -> tuple[RowSource, str]:
    """A source over ``split`` of the dataset ``cfg`` names, normalised as ``record`` (a
    saved model's data record) says, never augmented; and the dataset's name. HDF5 data is
    streamed (one pass reads each row once)."""
    from ..data import validate_for_model  # noqa: PLC0415

    found = find_data(cfg.data, dtype=model.dtype.name, seed=cfg.run.seed)
    try:
        validate_for_model(found, model.input_shape, model.output_shape[0], cfg.model.loss)
        part = found.test if split == "test" else found.train
        if part is None or len(part) == 0:
            raise UserError(f"dataset {found.name} has no {split} split")
    except BaseException:
        found.close()
        raise
    saved = record.get("normalize")
    stats = ChannelStats.from_dict(saved) if saved else None
    transform = BatchTransform(model.dtype, None, stats, cfg.run.seed)
    other = found.train if part is found.test else found.test
    if other is not None:
        other.close()
    return RowSource(part.reader, part.y, transform, rows, training=False), found.name
