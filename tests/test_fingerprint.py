"""The dataset fingerprint (what it detects, and the one thing it is documented to miss)
and the automatic choice between holding a split in memory and streaming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dptrain.data import fingerprint as fp
from dptrain.data.choice import SAFETY, choose_loader, mem_available
from dptrain.errors import UserError


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_small_files_any_change_is_detected(tmp_path):
    a = tmp_path / "a.h5"
    a.write_bytes(np.random.default_rng(0).bytes(300_000))
    rec = json.loads(json.dumps(fp.fingerprint([a])))  # plain JSON: what a checkpoint holds
    assert rec["files"][0] == {"name": "a.h5", "size": 300_000,
                               "sha256": rec["files"][0]["sha256"]}
    assert fp.compare(rec, fp.fingerprint([a])) == ""
    fp.check(rec, [a])
    for off in (0, 123_457, 299_999):
        flip_byte(a, off)
        assert "same size but other contents" in fp.compare(rec, fp.fingerprint([a]))
        flip_byte(a, off)
    with open(a, "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match=r"the dataset at .* changed since the checkpoint was "
                                        r"written: a\.h5 is 300,001 bytes but was 300,000"):
        fp.check(rec, [a])


def test_shard_list_changes_are_named(tmp_path):
    for n in ("s0.h5", "s1.h5"):
        (tmp_path / n).write_bytes(b"shard" * 10)
    rec = fp.fingerprint([tmp_path / "s0.h5", tmp_path / "s1.h5"])
    msg = fp.compare(rec, fp.fingerprint([tmp_path / "s0.h5"]))
    assert msg == "the dataset's files are ['s0.h5'] but were ['s0.h5', 's1.h5']"
    (tmp_path / "s1.h5").write_bytes(b"shard" * 9 + b"SHARD")
    assert fp.compare(rec, fp.fingerprint([tmp_path / "s0.h5", tmp_path / "s1.h5"])) == \
        "s1.h5 has the same size but other contents (SHA-256 differs)"
    with pytest.raises(UserError, match="cannot read dataset file"):
        fp.fingerprint([tmp_path / "gone.h5"])


def test_large_files_are_sampled(tmp_path):
    big = tmp_path / "big.h5"
    size = 200 << 20  # sparse: no 200 MB is written
    with open(big, "wb") as f:
        f.truncate(size)
    offs = fp.block_offsets(size)
    assert len(offs) == fp.BLOCKS and offs[0] == 0 and offs[-1] == size - fp.BLOCK_BYTES
    rec = fp.fingerprint([big])
    for off in (0, 5, size - 1, offs[17] + 1000):  # head, tail, a sampled block
        flip_byte(big, off)
        assert fp.compare(rec, fp.fingerprint([big])) != ""
        flip_byte(big, off)
    # between two sampled blocks an in-place edit of the same size goes unseen (documented)
    hole = offs[17] + fp.BLOCK_BYTES + 10
    assert hole < offs[18]
    flip_byte(big, hole)
    assert fp.compare(rec, fp.fingerprint([big])) == ""


def test_scheme_changes_are_reported(tmp_path):
    a = tmp_path / "a.h5"
    a.write_bytes(b"1")
    rec = fp.fingerprint([a]) | {"scheme": "md5 of nothing"}
    assert "taken another way" in fp.compare(rec, fp.fingerprint([a]))


def test_choose_memory_or_stream():
    gib = 2**30
    c = choose_loader(1 * gib, copies=1, available=8 * gib, where="MemAvailable")
    assert c.mode == "memory"
    assert c.reason == ("loader auto -> memory: the data needs 1,024 MiB, 12% of "
                        "8,192 MiB available (MemAvailable), within the 50% limit")
    c = choose_loader(1 * gib, copies=8, available=8 * gib, where="MemAvailable")
    assert c.mode == "stream" and "x 8 copies" in c.reason and "over the 50% limit" in c.reason
    at = choose_loader(int(SAFETY * 8 * gib), available=8 * gib, where="w")
    assert at.mode == "memory"
    assert choose_loader(int(SAFETY * 8 * gib) + 1, available=8 * gib, where="w").mode == \
        "stream"
    assert choose_loader(10, available=None).mode in ("memory", "stream")  # this machine


def test_mem_available_reads_meminfo_and_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000 kB\n"
                       "MemAvailable:    8000000 kB\n")
    self_cg = tmp_path / "cgroup"
    self_cg.write_text("0::/job/step\n")
    root = tmp_path / "fs"
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "step" / "memory.max").write_text("max\n")
    (root / "job" / "step" / "memory.current").write_text("100\n")
    assert mem_available(meminfo, root, self_cg) == (8_000_000 * 1024, "MemAvailable")
    (root / "job" / "step" / "memory.max").write_text(f"{3 * 2**30}\n")
    (root / "job" / "step" / "memory.current").write_text(f"{2**30}\n")
    assert mem_available(meminfo, root, self_cg) == (
        2 * 2**30, "the cgroup's memory.max - memory.current")
    assert mem_available(tmp_path / "none", tmp_path / "none", tmp_path / "none") == (None, "")
    avail, where = mem_available(meminfo, root, self_cg)
    c = choose_loader(2**30, available=avail, where=where)
    assert c.mode == "memory" and "cgroup" in c.reason
