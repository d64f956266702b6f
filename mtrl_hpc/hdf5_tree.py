"""Nested state trees <-> HDF5 groups, exactly and without pickle; plus a content checksum.

A state tree is a dict whose values are leaves or nested containers:

- containers: ``dict`` (str or int keys), ``list``, ``tuple``
- leaves: ``torch.Tensor`` (any strided dtype; bfloat16 / float8 are stored as raw unsigned integers with the
  torch dtype in an attribute), ``np.ndarray`` (numeric or bool), numpy scalars, ``int`` (any size),
  ``float``, ``bool``, ``str``, ``bytes``, ``None``

Every node is one HDF5 object carrying a ``kind`` attribute, so reading needs no guessing and never executes
code: a torch optimizer ``state_dict()`` (int keys, lists of dicts, tuples of floats) round-trips as is.
Lists of plain ints, floats or strings are stored as one dataset, not one object per element.

The checksum (``tree_digest``) is a sha256 over every object below a group in sorted path order: its path,
its attributes and, for datasets, dtype, shape and bytes. ``Digest`` lets a writer hash the bytes it has in
memory as it writes them (in a background thread), so writing does not read the file back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import re
from typing import Any

import h5py
import numpy as np
import torch

KIND = "kind"
_STR = h5py.string_dtype("utf-8")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# torch dtypes numpy cannot hold: stored as the unsigned integer of the same width.
_RAW_DTYPES = {torch.bfloat16: torch.uint16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        _RAW_DTYPES[getattr(torch, _name)] = torch.uint8
_TORCH_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class TreeError(ValueError):
    """A value cannot be stored, or a stored group is not a state tree of this format."""


# --------------------------------------------------------------------------------------------- names


def _encode_key(key) -> str:
    """HDF5 names cannot be empty, '.', or contain '/' or NUL; int keys are marked so they come back as ints."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TreeError(f"dict key {key!r} has type {type(key).__name__}; only str and int keys can be stored")
    if isinstance(key, int):
        return f"#{key}"
    name = key.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    if name.startswith("#"):
        name = "%23" + name[1:]
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    return name or "%"


_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def _decode_key(name: str):
    if name.startswith("#"):
        return int(name[1:])
    if name == "%":
        return ""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


# --------------------------------------------------------------------------------------------- digest


def _attr_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return b"b" + value
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    arr = np.asarray(value)
    if arr.dtype.kind in "OSU":
        return b"a" + repr([v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel()]).encode()
    return b"n" + arr.dtype.str.encode() + repr(arr.shape).encode() + arr.tobytes()


def _object_header(path: str, obj, skip_attrs=(), known=None) -> bytes:
    """Path, attributes, dtype and shape of an object; ``known`` = (attrs, dtype, shape) that the writer just
    wrote (saves reading them back; identical bytes, since attributes are compared in canonical form)."""
    parts = [b"P", path.encode("utf-8")]
    if known is not None:
        attrs, dtype, shape = known
    else:
        attrs = {name: obj.attrs[name] for name in obj.attrs.keys() if name not in skip_attrs}
        is_ds = isinstance(obj, h5py.Dataset)
        dtype, shape = (obj.dtype, obj.shape) if is_ds else (None, None)
    for name in sorted(attrs):
        parts += [b"A", name.encode("utf-8"), _attr_bytes(attrs[name])]
    if dtype is not None:
        parts += [b"D", np.dtype(dtype).str.encode(), repr(shape).encode()]
    return b"\0".join(parts)


def _string_bytes(arr: np.ndarray) -> bytes:
    items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in np.asarray(arr, dtype=object).ravel()]
    return b"".join(len(b).to_bytes(8, "little") + b for b in items)


BLOCK_BYTES = 8 << 20  # an object's bytes are hashed in blocks of this size, in parallel
SMALL_BYTES = 1 << 20  # objects up to this size are hashed on the calling thread
_MAX_PENDING_BLOCKS = 8  # bounded streams of a Digest wait when this many of their blocks are still being hashed


class Digest:
    """Collects one digest per HDF5 object; ``hexdigest()`` combines them in sorted path order.

    An object's digest is sha256(header, sha256 of each 8 MiB block of its bytes, byte count): the blocks of
    large arrays are hashed by worker threads (hashlib releases the GIL) while HDF5 writes the same bytes.
    """

    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _pool_pid = -1

    @classmethod
    def _executor(cls) -> concurrent.futures.ThreadPoolExecutor:
        if cls._pool is None or cls._pool_pid != os.getpid():  # a forked child has no worker thread: make one
            workers = max(1, min(4, os.cpu_count() or 1))
            cls._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mtrl_hpc-digest")
            cls._pool_pid = os.getpid()
        return cls._pool

    def __init__(self, skip_attrs=()):
        self.skip_attrs = tuple(skip_attrs)
        self._objects: dict[str, tuple[bytes, list, int]] = {}
        self._pending: collections.deque = collections.deque()  # blocks of streams still being hashed

    def add(self, path: str, obj, chunks=None, known=None):
        """Records ``obj`` (group or dataset) at ``path``; ``chunks`` are its bytes in C order (arrays);
        ``known``: (attrs, dtype or None, shape or None) as just written. The chunks are in memory already, so
        their blocks all go to the worker threads at once."""
        stream = DigestStream(self, path, _object_header(path, obj, self.skip_attrs, known), bounded=False)
        if obj is not None and isinstance(obj, h5py.Dataset) and chunks is None:
            chunks = [_read_dataset_bytes(obj)]
        for chunk in chunks or []:
            stream.update(chunk)
        stream.close()

    def stream(self, path: str, obj, known=None) -> DigestStream:
        """Records ``obj`` (a dataset) at ``path`` from bytes given piece by piece, in C order, to the returned
        stream's ``update``; its ``close`` completes the record. Same digest as ``add`` with all pieces at once,
        but at most _MAX_PENDING_BLOCKS blocks of the digest's streams wait for the workers at any time, so the
        pieces held stay bounded in memory however large the object."""
        return DigestStream(self, path, _object_header(path, obj, self.skip_attrs, known), bounded=True)

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for path in sorted(self._objects):
            header, digests, nbytes = self._objects[path]
            h = hashlib.sha256(header)
            for d in digests:
                h.update(d.result() if isinstance(d, concurrent.futures.Future) else d)
            h.update(nbytes.to_bytes(8, "little"))
            total.update(path.encode("utf-8") + b"\0" + h.digest())
        return total.hexdigest()


class DigestStream:
    """An object's bytes, fed piece by piece: cut into BLOCK_BYTES blocks, each hashed by a worker thread as
    soon as it is complete (objects of at most SMALL_BYTES are hashed on the calling thread)."""

    def __init__(self, digest: Digest, path: str, header: bytes, bounded: bool):
        self._digest, self._path, self._header, self._bounded = digest, path, header, bounded
        self._digests: list = []
        self._current: list[memoryview] = []
        self._filled = 0
        self._total = 0

    def update(self, piece) -> None:
        mv = _as_bytes_view(piece)
        self._total += len(mv)
        while len(mv):
            take = min(BLOCK_BYTES - self._filled, len(mv))
            self._current.append(mv[:take])
            self._filled += take
            mv = mv[take:]
            if self._filled == BLOCK_BYTES:
                self._submit(self._current)
                self._current, self._filled = [], 0

    def _submit(self, pieces) -> None:
        future = self._digest._executor().submit(_hash_pieces, pieces)
        self._digests.append(future)
        if self._bounded:
            pending = self._digest._pending  # shared by the digest's bounded streams
            pending.append(future)
            while pending and pending[0].done():
                pending.popleft()
            if len(pending) > _MAX_PENDING_BLOCKS:
                pending.popleft().result()  # wait for the oldest block: bounds the bytes held for hashing

    def close(self) -> None:
        if self._current:  # the last, partial block (none when the bytes end on a block edge)
            if self._total > SMALL_BYTES:
                self._submit(self._current)
            else:
                self._digests.append(_hash_pieces(self._current))
        self._current = []
        self._digest._objects[self._path] = (self._header, self._digests, self._total)


def _as_bytes_view(c) -> memoryview:
    if isinstance(c, (bytes, bytearray)):
        return memoryview(c)
    arr = np.ascontiguousarray(c)
    return memoryview(arr.reshape(-1).view(np.uint8))


def _hash_pieces(pieces) -> bytes:
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece)
    return h.digest()


def _read_dataset_bytes(ds: h5py.Dataset):
    if ds.shape is None:  # h5py.Empty
        return b""
    if h5py.check_string_dtype(ds.dtype) is not None or ds.dtype.kind == "O":
        return _string_bytes(ds[()])
    return np.array(ds[()], order="C")


def data_chunk(arr) -> Any:
    """The bytes of an array as the digest sees them (strings encoded, others raw)."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "OSU":
        return _string_bytes(arr)
    return np.ascontiguousarray(arr)


def tree_digest(group: h5py.Group, skip_attrs=()) -> str:
    """The checksum of everything below ``group`` (attributes in ``skip_attrs`` excluded)."""
    digest = Digest(skip_attrs)
    digest.add("/", group)

    def visit(name, obj):
        digest.add("/" + name, obj)

    group.visititems(visit)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- write


def write_tree(group: h5py.Group, tree: dict, digest: Digest | None = None, _path: str = "") -> None:
    """Writes ``tree`` (a dict) into ``group``; each written object is added to ``digest``."""
    if not isinstance(tree, dict):
        raise TreeError(f"a state tree must be a dict, got {type(tree).__name__}")
    group.attrs[KIND] = "dict"
    for key, value in tree.items():
        _write_node(group, _encode_key(key), value, digest, f"{_path}/{_encode_key(key)}", key)


def _dataset(group, name, data, kind, digest, path, chunks=None, **attrs):
    attrs = {KIND: kind, **attrs}
    if digest is not None:  # hashed (in the digest thread for large arrays) while HDF5 writes the same bytes
        arr = np.asarray(data)
        digest.add(path, None, [data_chunk(arr)] if chunks is None else chunks, known=(attrs, arr.dtype, arr.shape))
    ds = group.create_dataset(name, data=data)
    for k, v in attrs.items():
        ds.attrs[k] = v
    return ds


def _plain_list_kind(value) -> str | None:
    if not value:
        return None
    types = {type(v) for v in value}
    if types == {int} and all(_INT64_MIN <= v <= _INT64_MAX for v in value):
        return "list_int"
    if types == {float}:
        return "list_float"
    if types == {str} and not any("\0" in v for v in value):  # VLEN strings cannot hold NUL
        return "list_str"
    return None


def _write_node(group, name, value, digest, path, key):
    where = path.lstrip("/")
    if isinstance(value, dict):
        sub = group.create_group(name, track_order=True)
        write_tree(sub, value, digest, path)
        if digest is not None:
            digest.add(path, sub, [], known=({KIND: "dict"}, None, None))
        return
    if isinstance(value, (list, tuple)):
        container = "list" if isinstance(value, list) else "tuple"
        plain = _plain_list_kind(value)
        if plain is not None:
            data = np.array(value, dtype=_STR if plain == "list_str" else None)
            kind = plain if container == "list" else plain.replace("list", "tuple")
            chunks = [data_chunk(np.array(value, dtype=object))] if plain == "list_str" else None
            _dataset(group, name, data, kind, digest, path, chunks=chunks)
            return
        sub = group.create_group(name)
        sub.attrs[KIND] = container
        sub.attrs["length"] = len(value)
        for i, item in enumerate(value):
            _write_node(sub, str(i), item, digest, f"{path}/{i}", i)
        if digest is not None:
            digest.add(path, sub, [], known=({KIND: container, "length": len(value)}, None, None))
        return
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TreeError(f"{where}: tensor with layout {value.layout} cannot be stored; convert it to dense")
        t = value.detach().cpu().contiguous()
        raw = _RAW_DTYPES.get(t.dtype)
        arr = (t.view(raw) if raw is not None else t).numpy()
        _dataset(group, name, arr, "tensor", digest, path, torch_dtype=str(t.dtype))
        return
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc" :
            raise TreeError(f"{where}: numpy array of dtype {value.dtype} cannot be stored without pickle; "
                            "store numbers or convert strings to a list of str")
        _dataset(group, name, np.ascontiguousarray(value), "ndarray", digest, path)
        return
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        _dataset(group, name, np.asarray(value), "npscalar", digest, path)
        return
    if isinstance(value, bool):
        _dataset(group, name, np.uint8(value), "bool", digest, path)
        return
    if isinstance(value, int):
        data = np.int64(value) if _INT64_MIN <= value <= _INT64_MAX else np.array(str(value), dtype=_STR)
        _dataset(group, name, data, "int", digest, path,
                 chunks=None if data.dtype.kind == "i" else [data_chunk(np.array([str(value)], dtype=object))])
        return
    if isinstance(value, float):
        _dataset(group, name, np.float64(value), "float", digest, path)
        return
    if isinstance(value, str):
        if "\0" in value:  # VLEN strings cannot hold NUL: stored as its UTF-8 bytes
            _dataset(group, name, np.frombuffer(value.encode("utf-8"), dtype=np.uint8), "str_utf8", digest, path)
        else:
            _dataset(group, name, np.array(value, dtype=_STR), "str", digest, path,
                     chunks=[data_chunk(np.array([value], dtype=object))])
        return
    if isinstance(value, bytes):
        _dataset(group, name, np.frombuffer(value, dtype=np.uint8), "bytes", digest, path)
        return
    if value is None:
        ds = group.create_dataset(name, data=h5py.Empty("u1"))
        ds.attrs[KIND] = "none"
        if digest is not None:
            digest.add(path, ds, [])
        return
    raise TreeError(
        f"{where}: values of type {type(value).__name__} cannot be stored; use tensors, arrays, numbers, str, "
        "bytes, None, or dicts/lists/tuples of these"
    )


# --------------------------------------------------------------------------------------------- read


def read_tree(group: h5py.Group) -> dict:
    """Reads a group written by ``write_tree`` back into a dict (tensors on the CPU)."""
    if group.attrs.get(KIND) != "dict":
        raise TreeError(f"{group.name} is not a state tree group (its 'kind' attribute is {group.attrs.get(KIND)!r})")
    return _read_node(group)


def _read_node(obj):
    kind = obj.attrs.get(KIND)
    if isinstance(kind, bytes):
        kind = kind.decode()
    if isinstance(obj, h5py.Group):
        if kind == "dict":
            return {_decode_key(name): _read_node(obj[name]) for name in obj.keys()}
        if kind in ("list", "tuple"):
            n = int(obj.attrs["length"])
            items = [_read_node(obj[str(i)]) for i in range(n)]
            return items if kind == "list" else tuple(items)
        raise TreeError(f"{obj.name}: group of unknown kind {kind!r}")
    if kind == "none":
        return None
    if kind in ("list_int", "list_float", "tuple_int", "tuple_float"):
        items = obj[()].tolist()
        return items if kind.startswith("list") else tuple(items)
    if kind in ("list_str", "tuple_str"):
        items = [s.decode("utf-8") if isinstance(s, bytes) else s for s in obj[()].tolist()]
        return items if kind.startswith("list") else tuple(items)
    if kind == "tensor":
        dtype_name = obj.attrs["torch_dtype"]
        dtype = _TORCH_DTYPES.get(dtype_name)
        if dtype is None:
            raise TreeError(f"{obj.name}: unknown torch dtype {dtype_name!r} (written by a newer torch?)")
        t = torch.from_numpy(np.array(obj[()], order="C"))
        return t.view(dtype) if dtype in _RAW_DTYPES else t.to(dtype)
    if kind == "ndarray":
        return np.array(obj[()], order="C")
    if kind == "npscalar":
        return obj[()]
    if kind == "bool":
        return bool(obj[()])
    if kind == "int":
        v = obj[()]
        return int(v.decode() if isinstance(v, bytes) else v)
    if kind == "float":
        return float(obj[()])
    if kind == "str":
        v = obj[()]
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)
    if kind == "bytes":
        return obj[()].tobytes()
    if kind == "str_utf8":
        return obj[()].tobytes().decode("utf-8")
    raise TreeError(f"{obj.name}: dataset of unknown kind {kind!r}")
