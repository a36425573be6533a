#!/usr/bin/env python
"""Convert the official CIFAR-10 or CIFAR-100 binary tarball into dptrain's HDF5 format.

TARBALL is ``cifar-10-binary.tar.gz`` or ``cifar-100-binary.tar.gz`` (the binary version,
never the pickled python version), read as a stream without extracting anything. The
output has /train and /test with x uint8 (N, 32, 32, 3) (NHWC; dptrain scales uint8 by
1/255 on load) and y int64, for CIFAR-100 the fine labels in y and the coarse ones in
y_coarse, and the root attributes name, num_classes, class_names (and coarse_class_names).
It is stored contiguous and uncompressed (pixels barely compress), so that a streamed
batch reads each image straight from the file, through a temporary file renamed into
place. Errors
print one line; exit code 2.

    python scripts/prepare_cifar.py ~/Downloads/cifar-10-binary.tar.gz data/cifar10.h5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dptrain.data.cifar import LAYOUTS, read_cifar
from dptrain.data.writer import save_hdf5
from dptrain.errors import UserError

SOURCES = {
    "cifar10": "CIFAR-10 (A. Krizhevsky, 2009: Learning Multiple Layers of Features from "
               "Tiny Images)",
    "cifar100": "CIFAR-100 (A. Krizhevsky, 2009: Learning Multiple Layers of Features from "
                "Tiny Images)",
}


def convert(tarball: Path, out: Path, kind: str = "auto") -> str:
    """Write ``out`` from ``tarball``; returns the summary line."""
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    data = read_cifar(tarball, None if kind == "auto" else LAYOUTS[kind])
    name = data.layout.name
    attrs = {"name": name, "num_classes": data.layout.classes, "source": SOURCES[name]}
    if data.class_names:
        attrs["class_names"] = data.class_names
    extra = {}
    if data.layout.coarse_classes:
        extra = {f"{s}/y_coarse": data.y_coarse[s] for s in data.x}
        if data.coarse_names:
            attrs["coarse_class_names"] = data.coarse_names
    try:
        save_hdf5(out, {s: (data.x[s], data.y[s]) for s in data.x}, attrs, chunk_rows=None,
                  compress=False, fsync=True, extra=extra)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e})") from None
    return (f"wrote {out}: {name}, {len(data.y['train'])} train, {len(data.y['test'])} test "
            f"images of shape (32, 32, 3), {data.layout.classes} classes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare_cifar", description=__doc__.splitlines()[0])
    p.add_argument("tarball", type=Path, help="cifar-10-binary.tar.gz or cifar-100-binary.tar.gz")
    p.add_argument("out", type=Path, help="output .h5 file")
    p.add_argument("--kind", choices=["auto", *LAYOUTS], default="auto",
                   help="which archive it is (default: from its contents)")
    a = p.parse_args(argv)
    try:
        line = convert(a.tarball, a.out, a.kind)
    except UserError as e:
        print(f"prepare_cifar: error: {e}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
