"""Checks on HDF5 objects from files dptrain did not just write (user data, edited files).

HDF5 lets a file hold much that a plain reader trips over: soft links that lead nowhere,
external links into other files, one object under several names (or a group inside
itself), named datatypes, attributes of any type, number types with odd precisions, and
datasets whose type and shape promise more bytes than their storage holds (HDF5 then
returns fill values or neighbouring bytes). These functions turn each of those into a
one-line ``UserError`` naming the file (``where``) and the object, before anything is
read from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import UserError

#: what h5py raises for a file whose metadata is damaged (HDF5 keeps no checksum of it)
DAMAGE = (OSError, RuntimeError, ValueError, TypeError, KeyError)


def first_line(e: BaseException) -> str:
    """The first line of an error's text (h5py's run over several), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def damaged(label: str | Any, e: BaseException) -> UserError:
    """The one line for a file h5py cannot make sense of."""
    return UserError(f"{label}: damaged or unreadable HDF5 file ({first_line(e)})")


def _h5py() -> Any:
    import h5py  # noqa: PLC0415  (keeps `--help` fast)

    return h5py


def _name(raw: bytes, parent: str, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: {parent} holds an object whose name is not text ({raw!r}); "
                        "the file is damaged") from None


def walk(f: Any, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every group and dataset of open file ``f`` by path (``/a/b``), as (groups, datasets).

    Refuses soft, external and user-defined links, objects reachable under more than
    one name (hard links, which also make cycles), and objects other than groups and
    datasets: a dptrain file holds a plain tree.
    """
    h5py = _h5py()
    h5l, h5o = h5py.h5l, h5py.h5o
    if h5o.get_info(f.id).rc != 1:
        raise UserError(f"{where}: its root group is linked from inside the file (a cycle)")
    groups: dict[str, Any] = {"/": f}
    datasets: dict[str, Any] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        g = groups[path]
        for raw in list(g.id):
            name = _name(raw, path, where)
            full = f"{path.rstrip('/')}/{name}"
            kind = g.id.links.get_info(raw).type
            if kind == h5l.TYPE_SOFT:
                target = g.id.links.get_val(raw).decode("utf-8", "replace")
                raise UserError(f"{where}: {full} is a soft link (to {target}); a dptrain file "
                                "holds no links")
            if kind == h5l.TYPE_EXTERNAL:
                raise UserError(f"{where}: {full} is an external link (into another file); "
                                "a dptrain file holds no links")
            if kind != h5l.TYPE_HARD:
                raise UserError(f"{where}: {full} is a link of an unknown kind ({kind})")
            info = h5o.get_info(h5o.open(g.id, raw))
            if info.rc != 1:
                raise UserError(f"{where}: {full} is one object under {info.rc} names (hard "
                                "links); a dptrain file names every object once")
            if info.type == h5o.TYPE_GROUP:
                groups[full] = g[name]
                todo.append(full)
            elif info.type == h5o.TYPE_DATASET:
                datasets[full] = g[name]
            else:
                raise UserError(f"{where}: {full} is a named datatype, not a group or an array")
    return groups, datasets


# -- attributes --------------------------------------------------------------------------
def _attr(obj: Any, key: str, where: str, required: bool) -> Any:
    if key not in obj.attrs:
        if required:
            raise UserError(f"{where} lacks the {key!r} attribute of {obj.name}")
        return None
    return obj.attrs[key]


def attr_text(obj: Any, key: str, where: str, required: bool = True) -> str | None:
    """Attribute ``key`` of ``obj`` as text (HDF5 variable- or fixed-length strings)."""
    v = _attr(obj, key, where, required)
    if v is None:
        return None
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: attribute {key!r} of {obj.name} is not UTF-8 text") \
                from None
    if isinstance(v, str):
        return str(v)
    raise UserError(f"{where}: attribute {key!r} of {obj.name} must be text, not "
                    f"{_describe(v)}")


#: integers beyond this do not survive a float64 round trip (counters are broadcast so)
INT_LIMIT = 2**53


def attr_int(obj: Any, key: str, where: str, required: bool = True,
             minimum: int | None = 0, maximum: int | None = INT_LIMIT) -> int | None:
    """Attribute ``key`` of ``obj`` as one integer in [``minimum``, ``maximum``]."""
    v = _attr(obj, key, where, required)
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise UserError(f"{where}: attribute {key!r} of {obj.name} must be an integer, not "
                        f"{_describe(v)}")
    if minimum is not None and int(v) < minimum:
        raise UserError(f"{where}: attribute {key!r} of {obj.name} is {int(v)}, below "
                        f"{minimum}")
    if maximum is not None and int(v) > maximum:
        raise UserError(f"{where}: attribute {key!r} of {obj.name} is {int(v)}, above "
                        f"{maximum:,}")
    return int(v)


def attr_float(obj: Any, key: str, where: str, required: bool = True) -> float | None:
    """Attribute ``key`` of ``obj`` as one real number (NaN allowed)."""
    v = _attr(obj, key, where, required)
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer,
                                                            np.floating)):
        raise UserError(f"{where}: attribute {key!r} of {obj.name} must be a number, not "
                        f"{_describe(v)}")
    return float(v)


def _describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape} ({v.dtype})"
    return f"{type(v).__name__} {v!r}"[:80]


# -- datasets ----------------------------------------------------------------------------
def _standard_types() -> list[Any]:
    h5t = _h5py().h5t
    names = [f"IEEE_F{b}{e}" for b in (16, 32, 64) for e in ("LE", "BE")]
    names += [f"STD_{k}{b}{e}" for k in "IU" for b in (8, 16, 32, 64) for e in ("LE", "BE")]
    return [getattr(h5t, n) for n in names if hasattr(h5t, n)] + [h5t.NATIVE_LDOUBLE]


def check_stored(ds: Any, where: str) -> None:
    """``ds`` holds real numbers in a standard type, and (when stored contiguously, without
    filters) exactly the bytes its shape and type need: a damaged type or layout message
    would otherwise read as wrong numbers without any error."""
    h5py = _h5py()
    tid = ds.id.get_type()
    if tid.get_class() == h5py.h5t.ENUM and ds.dtype.kind == "b":
        tid = tid.get_super()  # numpy booleans are stored as an enum over an integer
    if not any(tid.equal(t) for t in _standard_types()):
        raise UserError(f"{where}: {ds.name} is stored in a non-standard number type "
                        f"({ds.dtype}, HDF5 class {tid.get_class()}); the file is damaged "
                        "or was not written by numpy/h5py")
    if not ds.size or ds.id.get_create_plist().get_nfilters():
        return  # compressed or checksummed: HDF5's filters check what they can
    if ds.is_virtual or ds.external:
        return  # the bytes live in other files
    have = int(ds.id.get_storage_size())
    if ds.chunks is None:
        need = int(ds.size) * ds.dtype.itemsize
    else:  # every stored chunk of an unfiltered dataset is exactly one chunk's bytes
        need = int(ds.id.get_num_chunks()) * int(np.prod(ds.chunks)) * ds.dtype.itemsize
    if have != need:
        raise UserError(f"{where}: {ds.name} is damaged or incomplete: its storage holds "
                        f"{have} bytes, its shape {ds.shape} and type {ds.dtype} need {need}")


def check_complete(ds: Any, where: str) -> None:
    """Every byte of ``ds`` is stored (no chunk left to fill values): bounds what reading
    it allocates by the file's size. For files written without compression."""
    need = int(ds.size) * ds.dtype.itemsize
    if need and int(ds.id.get_storage_size()) < need:
        raise UserError(f"{where}: {ds.name} is incomplete: its storage holds "
                        f"{int(ds.id.get_storage_size())} bytes, its shape {ds.shape} and type "
                        f"{ds.dtype} need {need}")


def _spans(ds: Any, where: str) -> list[tuple[int, int]]:
    """The byte ranges of the file that hold ``ds`` (contiguous storage, or each chunk)."""
    if ds.is_virtual or ds.external:
        return []
    if ds.chunks is None:
        offset = ds.id.get_offset()
        return [] if offset is None else [(int(offset), int(ds.id.get_storage_size()))]
    chunks: list[Any] = []
    if hasattr(ds.id, "chunk_iter"):  # HDF5 >= 1.14: one pass over the chunk index
        ds.id.chunk_iter(chunks.append)
    else:
        chunks = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    implied = int(np.prod([-(-n // c) for n, c in zip(ds.shape, ds.chunks, strict=True)]))
    if len(chunks) != implied:
        raise UserError(f"{where}: {ds.name} is damaged or incomplete: {len(chunks)} of its "
                        f"{implied} chunks are stored (the rest would read as fill values)")
    for c in chunks:
        if c.filter_mask:
            raise UserError(f"{where}: {ds.name} is damaged: a chunk at {c.chunk_offset} "
                            "skips one of its filters")
        if any(o % n or o >= d for o, n, d in zip(c.chunk_offset, ds.chunks, ds.shape,
                                                   strict=True)):
            raise UserError(f"{where}: {ds.name} is damaged: a chunk starts at "
                            f"{c.chunk_offset}, off its grid {ds.chunks} in {ds.shape}")
    return [(int(c.byte_offset), int(c.size)) for c in chunks]


def check_disjoint(datasets: list[Any], file_size: int, where: str) -> None:
    """The datasets' bytes lie inside the file, every chunk is stored once and none shares
    bytes with another: a damaged address or chunk index would otherwise read other
    numbers (or fill values) without any error from HDF5."""
    spans = []
    for ds in datasets:
        spans += [(o, n, ds.name) for o, n in _spans(ds, where)]
    spans.sort()
    for (o1, n1, a), (o2, _, b) in zip(spans, spans[1:], strict=False):
        if o1 + n1 > o2:
            what = f"{a} and {b} share" if a != b else f"two chunks of {a} share"
            raise UserError(f"{where}: {what} bytes of the file; the file is damaged")
    if spans and max(o + n for o, n, _ in spans) > file_size:
        raise UserError(f"{where}: a dataset reaches past the end of the file (truncated?)")
