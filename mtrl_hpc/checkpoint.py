"""HDF5 checkpoints: write atomically, verify, rotate, find the latest good one, restore.

Layout of a run directory::

    <run_dir>/checkpoints/step_<step:012d>.h5         one per checkpoint: state tree, config, replay header
    <run_dir>/checkpoints/replay/seg_<step>_<id>.h5    replay segments (rows written between two checkpoints)

A checkpoint file holds, at its root, the attributes ``format`` ("mtrl_hpc.checkpoint"), ``format_version``,
``step``, ``created_utc``, ``version_<lib>`` (python, torch, numpy, h5py, hdf5, mtrl_hpc, metaworld) and
``sha256``: a checksum over every object, attribute and byte in the file except itself (see
``mtrl_hpc.hdf5_tree``). ``/state`` is the state tree, ``/config`` the resolved config as a YAML string,
``/replay`` (optional) the chain of replay segments (names, checksums, delta rows) and the buffer's add counts.

Every file is written to a hidden temporary name in the same directory, flushed, fsynced, chmod 0o644,
renamed over its final name, and the directory is fsynced. Files are never modified after the rename, so a
crash (or kill -9) at any moment leaves every earlier checkpoint intact.

Replay buffer rows are stored incrementally as a chain of immutable segment files. The buffer owns the row
format: a segment holds, in its ``/replay`` group, what ``replay.save_hdf5(group, since=...)`` writes there: the
rows each task added since the parent checkpoint (``since`` = the buffer's ``added_counts()`` then) and its small
state (add counts, sample counter, seed, layout); a ``base`` segment (``since=None``) holds every filled row.
The segment's root records its kind and parent. A checkpoint lists its whole chain (base first) with each
segment's checksum and the add counts at its end. A new base is written when the delta rows of the chain would
exceed the buffer size, so a chain never holds more than twice the buffer. Rotation deletes a segment only
when no retained checkpoint lists it. Restoring calls ``replay.load_hdf5`` on each segment of the chain in
order and reproduces ``state_dict()`` exactly.

``retain_last_n``: the number of checkpoints kept. ``-1`` keeps all. ``n >= 1`` keeps the ``n`` newest after
each successful write. ``0`` keeps no checkpoint after the run: while the run is in progress the newest one is
kept (exactly as with 1, so a preempted or requeued job can resume), and ``finish_run(run_dir, 0)``, called
by the training loop when the run has completed, deletes all of them.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import re
import secrets
import sys
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import torch

from mtrl_hpc import files, hdf5_tree
from mtrl_hpc.errors import short_error
from mtrl_hpc.hdf5_tree import Digest, TreeError, read_tree, write_tree

FORMAT = "mtrl_hpc.checkpoint"
SEGMENT_FORMAT = "mtrl_hpc.replay_segment"
# Version 2 added the reward normaliser's statistics to the state; a version 1 checkpoint cannot resume exactly.
FORMAT_VERSION = 2
SEGMENT_FORMAT_VERSION = 1
# format -> (version written, oldest version read)
_VERSIONS = {FORMAT: (FORMAT_VERSION, 2), SEGMENT_FORMAT: (SEGMENT_FORMAT_VERSION, 1)}
CHECKSUM_ATTR = "sha256"

_STEP_RE = re.compile(r"^step_(\d{12})\.h5$")
_SEG_RE = re.compile(r"^seg_(\d{12})_[0-9a-f]{8}\.h5$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(Exception):
    """A checkpoint cannot be written, verified or restored; the message says which file and what to do."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint of a format version this mtrl_hpc does not read: the run must not silently start over."""


# ============================================================================================ public API


def checkpoint_dir(run_dir) -> pathlib.Path:
    return pathlib.Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir, step: int) -> pathlib.Path:
    return checkpoint_dir(run_dir) / f"step_{int(step):012d}.h5"


def save(run_dir, step: int, state: dict, replay=None, config_yaml: str = "", retain_last_n: int = 1) -> pathlib.Path:
    """Writes ``<run_dir>/checkpoints/step_<step>.h5`` atomically, then rotates; returns its path.

    ``state`` is a state tree (see ``mtrl_hpc.hdf5_tree``): e.g. networks' and optimizers' ``state_dict()``,
    ``log_alpha``, RNG states, counters. ``replay`` (optional, a ``mtrl_hpc.replay.ReplayBuffer``) is stored incrementally
    (see the module doc).
    """
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    if not isinstance(retain_last_n, int) or retain_last_n < -1:
        raise CheckpointError(f"retain_last_n must be -1 (keep all), 0 or a positive int, got {retain_last_n!r}")
    step = int(step)
    ckdir = checkpoint_dir(run_dir)
    _makedirs(ckdir)
    final = checkpoint_path(run_dir, step)

    replay_header = None
    if replay is not None:
        replay_header = _save_replay(ckdir, step, replay)

    def body(f: h5py.File, digest: Digest):
        f.attrs["step"] = step
        grp = f.create_group("state", track_order=True)
        try:
            write_tree(grp, state, digest, "/state")
        except TreeError as e:
            raise CheckpointError(f"cannot store the state for step {step}: {e}") from None
        digest.add("/state", grp, [])
        ds = f.create_dataset("config", data=np.array(config_yaml or "", dtype=h5py.string_dtype("utf-8")))
        digest.add("/config", ds, [hdf5_tree.data_chunk(np.array([config_yaml or ""], dtype=object))])
        if replay_header is not None:
            rgrp = f.create_group("replay", track_order=True)
            write_tree(rgrp, replay_header, digest, "/replay")
            digest.add("/replay", rgrp, [])

    _write_atomic(final, FORMAT, body)
    if replay is not None:
        _remember_chain(replay, ckdir, replay_header)
    _rotate(ckdir, step, retain_last_n)
    return final


def latest_path(run_dir) -> pathlib.Path | None:
    """The newest checkpoint file of ``run_dir`` by step, not verified (``find_latest_good`` verifies)."""
    ckdir = checkpoint_dir(run_dir)
    found = _list_checkpoints(ckdir) if ckdir.is_dir() else []
    return max(found)[1] if found else None


def step_of(path) -> int:
    """The step a checkpoint file was written at, from its name (step_<12 digits>.h5)."""
    m = _STEP_RE.match(pathlib.Path(path).name)
    if not m:
        raise CheckpointError(f"{path} is not a checkpoint file name (step_<12 digits>.h5)")
    return int(m.group(1))


def find_latest_good(run_dir) -> pathlib.Path | None:
    """The newest checkpoint of ``run_dir`` that verifies, or None; warns about each newer one that does not.

    Leftover temporary files of interrupted writes are deleted.
    """
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.is_dir():
        return None
    _remove_temp_files(ckdir)
    _remove_temp_files(ckdir / "replay")
    for step, path in sorted(_list_checkpoints(ckdir), reverse=True):
        try:
            verify(path)
            return path
        except CheckpointVersionError:
            raise
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}", RuntimeWarning, stacklevel=2)
    return None


def verify(path, replay: bool = True) -> None:
    """Recomputes the checksums of a checkpoint and, with ``replay``, of every replay segment it needs; raises
    CheckpointError. ``replay=False`` checks the file alone: what a policy needs, wherever the file was copied to."""
    path = pathlib.Path(path)
    with _open(path, FORMAT) as f:
        _check_digest(f, path)
        header = _read_replay_header(f, path)
    if replay and header is not None:
        for name, sha in zip(header["chain"], header["chain_sha256"]):
            _verify_segment(path.parent / "replay" / name, sha, path)
    key = _identity(path)
    _VERIFIED[key] = max(_VERIFIED.get(key, 0), _WITH_REPLAY if replay else _FILE_ONLY)


def load(path, replay=None) -> tuple[dict, str]:
    """Verifies and reads a checkpoint: returns (state tree with CPU torch tensors, config YAML string).

    With ``replay`` given, its contents are also restored (``load_replay``); without, the replay segments are
    neither read nor needed.
    """
    path = pathlib.Path(path)
    _verify_once(path, _FILE_ONLY if replay is None else _WITH_REPLAY)
    with _open(path, FORMAT) as f:
        try:
            state = read_tree(f["state"])
            config = f["config"][()]
        except (KeyError, TreeError) as e:
            raise CheckpointError(f"{path} is not a complete mtrl_hpc checkpoint ({e}); delete it") from None
    config = config.decode("utf-8") if isinstance(config, bytes) else str(config)
    if replay is not None:
        load_replay(path, replay)
    return state, config


def load_replay(path, replay) -> None:
    """Restores ``replay`` in place from the checkpoint's segment chain (``replay.load_hdf5`` on each segment);
    a later ``save`` with the same buffer continues that chain."""
    path = pathlib.Path(path)
    _verify_once(path, _WITH_REPLAY)
    with _open(path, FORMAT) as f:
        header = _read_replay_header(f, path)
    if header is None:
        raise CheckpointError(
            f"{path} holds no replay buffer but one was asked for; pass replay=None, or resume from a "
            "checkpoint written with the replay buffer"
        )
    _load_replay(path, header, replay)


def check_compatible(saved_config: Mapping, current_config: Mapping, keys) -> None:
    """Raises CheckpointError naming every dotted key in ``keys`` whose value differs between the configs."""
    missing = object()

    def get(cfg, dotted):
        node = cfg
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return missing
            node = node[part]
        return node

    diffs = []
    for key in keys:
        a, b = get(saved_config, key), get(current_config, key)
        if a is missing and b is missing:
            continue
        if a is missing or b is missing or _plain(a) != _plain(b):
            show = lambda v: "<missing>" if v is missing else _plain(v)  # noqa: E731
            diffs.append(f"{key}: checkpoint has {show(a)}, this run has {show(b)}")
    if diffs:
        raise CheckpointError(
            "the checkpoint was written by a run with a different configuration: "
            + "; ".join(diffs)
            + "; start a new run directory or set experiment.should_resume=False"
        )


def finish_run(run_dir, retain_last_n: int) -> None:
    """Call when the run has completed: with ``retain_last_n == 0`` deletes every checkpoint and segment."""
    if retain_last_n != 0:
        return
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.is_dir():
        return
    for _, path in _list_checkpoints(ckdir):
        path.unlink(missing_ok=True)
    segdir = ckdir / "replay"
    if segdir.is_dir():
        for p in segdir.iterdir():
            if _SEG_RE.match(p.name) or p.name.startswith(_TMP_PREFIX):
                p.unlink(missing_ok=True)
    files.fsync_dir(ckdir)


# ============================================================================================ files


def _makedirs(path: pathlib.Path) -> None:
    try:
        files.make_dirs(path)
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint directory {path} ({e}); check the run directory's "
                              "path and permissions") from None


def _write_atomic(final: pathlib.Path, fmt: str, body) -> str:
    """Writes an HDF5 file via ``body(file, digest)`` to a temp name, seals it with its checksum, renames it."""
    tmp = files.temp_path(final, _TMP_PREFIX)
    try:
        try:
            with h5py.File(tmp, "w", track_order=True) as f:
                digest = Digest(skip_attrs=(CHECKSUM_ATTR,))
                f.attrs["format"] = fmt
                f.attrs["format_version"] = _VERSIONS[fmt][0]
                f.attrs["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                for lib, version in _versions().items():
                    f.attrs[f"version_{lib}"] = str(version)
                body(f, digest)
                digest.add("/", f, [])
                sha = digest.hexdigest()
                f.attrs[CHECKSUM_ATTR] = sha
        except OSError as e:
            raise CheckpointError(
                f"cannot write {final} ({e}); check free space and permissions of {final.parent}") from None
        files.publish(tmp, final)
        tmp = None
        return sha
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _versions() -> dict[str, str]:
    import mtrl_hpc

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "mtrl_hpc": getattr(mtrl_hpc, "__version__", "unknown"),
    }
    try:
        from importlib.metadata import version

        out["metaworld"] = version("metaworld")
    except Exception:  # not installed: recorded as absent
        out["metaworld"] = "not installed"
    return out


class _open:
    """Opens a file of a given format read-only; every h5py/OS failure becomes a CheckpointError."""

    def __init__(self, path: pathlib.Path, fmt: str):
        self.path, self.fmt = path, fmt

    def __enter__(self) -> h5py.File:
        path = self.path
        if not path.exists():
            raise CheckpointError(f"{path} does not exist")
        try:
            self.f = h5py.File(path, "r")
        except OSError as e:
            size = path.stat().st_size
            raise CheckpointError(
                f"{path} ({size} bytes) cannot be opened as HDF5: it is truncated, corrupted or not an HDF5 file "
                f"({short_error(e)}); delete it, an earlier checkpoint will be used"
            ) from None
        try:
            fmt = self.f.attrs.get("format")
            version = self.f.attrs.get("format_version")
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
            self.f.close()
            raise CheckpointError(f"{path} is damaged: its root attributes cannot be read ({short_error(e)}); delete it, "
                                  "an earlier checkpoint will be used") from None
        if fmt != self.fmt:
            self.f.close()
            raise CheckpointError(
                f"{path} is an HDF5 file but not a {self.fmt} file (its 'format' attribute is {fmt!r}); "
                "move it out of the checkpoints directory"
            )
        newest, oldest = _VERSIONS[self.fmt]
        if version is None or int(version) > newest:
            self.f.close()
            raise CheckpointVersionError(
                f"{path} has format_version {version!r}; this mtrl_hpc reads up to {newest}: upgrade mtrl_hpc"
            )
        if int(version) < oldest:
            self.f.close()
            raise CheckpointVersionError(
                f"{path} has format_version {int(version)}, written by an older mtrl_hpc; this one reads versions "
                f"{oldest}-{newest} and cannot resume it exactly: start the run in a new directory, or finish it "
                "with the mtrl_hpc that wrote it"
            )
        return self.f

    def __exit__(self, *exc):
        self.f.close()
        failures = (OSError, KeyError, RuntimeError, ValueError, TypeError)
        if exc[0] is not None and issubclass(exc[0], failures) and not issubclass(exc[0], CheckpointError):
            raise CheckpointError(
                f"{self.path} is damaged: reading it failed ({short_error(exc[1])}); delete it, an earlier checkpoint "
                "will be used"
            ) from None
        return False


def _check_digest(f: h5py.File, path: pathlib.Path) -> str:
    stored = f.attrs.get(CHECKSUM_ATTR)
    if stored is None:
        raise CheckpointError(f"{path} has no checksum: it was not completely written; delete it")
    actual = hdf5_tree.tree_digest(f, skip_attrs=(CHECKSUM_ATTR,))
    if actual != stored:
        raise CheckpointError(
            f"{path} fails its checksum (stored {stored[:12]}..., contents hash to {actual[:12]}...): the file was "
            "modified or damaged after it was written; delete it, an earlier checkpoint will be used"
        )
    return stored


# What has been verified of a file (by its identity: path, inode, size, mtime), so that a resume checksums
# each file once: the file alone, or the file and its replay segments.
_FILE_ONLY, _WITH_REPLAY = 1, 2
_VERIFIED: dict[tuple, int] = {}


def _verify_once(path: pathlib.Path, level: int) -> None:
    if _VERIFIED.get(_identity(path), 0) < level:
        verify(path, replay=level == _WITH_REPLAY)


def _identity(path: pathlib.Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (str(path),)
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def _list_checkpoints(ckdir: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    return [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := _STEP_RE.match(p.name))]


def _remove_temp_files(directory: pathlib.Path) -> None:
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith(_TMP_PREFIX):
            try:
                p.unlink()
            except OSError:
                pass


def _rotate(ckdir: pathlib.Path, step: int, retain_last_n: int) -> None:
    checkpoints = sorted(_list_checkpoints(ckdir))
    # Newer checkpoints than the one just written belong to a timeline this run abandoned when it resumed
    # from an earlier (the newest good) checkpoint: they would otherwise outrank every new checkpoint.
    for s, p in checkpoints:
        if s > step:
            warnings.warn(f"deleting {p}: it is newer than step {step}, which this run has just written after "
                          "resuming from an earlier checkpoint", RuntimeWarning, stacklevel=3)
            p.unlink(missing_ok=True)
    checkpoints = [(s, p) for s, p in checkpoints if s <= step]
    keep_n = len(checkpoints) if retain_last_n == -1 else max(1, retain_last_n)
    for _, p in checkpoints[:-keep_n]:
        p.unlink(missing_ok=True)
    retained = [p for _, p in checkpoints[-keep_n:]]
    segdir = ckdir / "replay"
    if not segdir.is_dir():
        return
    needed: set[str] = set()
    for p in retained:
        try:
            with _open(p, FORMAT) as f:
                if "replay" in f:
                    needed.update(hdf5_tree._read_node(f["replay/chain"]))
        except (CheckpointError, KeyError, TreeError):
            return  # cannot tell what a retained checkpoint needs: delete no segment this time
    for p in segdir.iterdir():  # deletions need not be durable: a resurrected old file is rotated again
        if _SEG_RE.match(p.name) and p.name not in needed:
            p.unlink(missing_ok=True)


# ============================================================================================ replay

# The segment chain each replay buffer object last saved to or was restored from: a later save continues it.
_CHAINS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _remember_chain(replay, ckdir: pathlib.Path, header: dict) -> None:
    _CHAINS[replay] = {"ckdir": str(ckdir.resolve()), "added": np.asarray(header["added"], dtype=np.int64).copy(),
                       **{k: header[k] for k in ("chain", "chain_sha256", "chain_rows")}}


def _save_replay(ckdir: pathlib.Path, step: int, replay) -> dict:
    segdir = ckdir / "replay"
    _makedirs(segdir)
    added = replay.added_counts()
    capacity, total = replay.capacity_per_task, replay.num_tasks * replay.capacity_per_task
    prev = _CHAINS.get(replay)
    since = None
    if (prev is not None and prev["ckdir"] == str(ckdir.resolve()) and prev["added"].shape == added.shape
            and (added >= prev["added"]).all() and all((segdir / n).exists() for n in prev["chain"])):
        delta_rows = int(np.minimum(added - prev["added"], capacity).sum())
        if prev["chain_rows"] + delta_rows <= total:  # else the chain would outgrow the buffer: a new base
            since = prev["added"]
    if since is None:
        kind, parent, chain, chain_sha, chain_rows = "base", "", [], [], 0
    else:
        kind, parent = "delta", prev["chain"][-1]
        chain, chain_sha = list(prev["chain"]), list(prev["chain_sha256"])
        chain_rows = prev["chain_rows"] + delta_rows

    def body(f: h5py.File, digest: Digest):
        f.attrs["step"] = step
        f.attrs["kind"] = kind
        f.attrs["parent"] = parent
        try:
            replay.save_hdf5(f.create_group("replay"), since=since, digest=digest)
        except ValueError as e:
            raise CheckpointError(f"cannot store the replay buffer for step {step}: {e}") from None

    name = f"seg_{step:012d}_{secrets.token_hex(4)}.h5"
    chain.append(name)
    chain_sha.append(_write_atomic(segdir / name, SEGMENT_FORMAT, body))
    return {"chain": chain, "chain_sha256": chain_sha, "chain_rows": int(chain_rows), "added": added}


def _read_replay_header(f: h5py.File, path: pathlib.Path) -> dict | None:
    if "replay" not in f:
        return None
    try:
        header = read_tree(f["replay"])
        header["added"] = np.asarray(header["added"], dtype=np.int64)
        if len(header["chain"]) != len(header["chain_sha256"]) or not header["chain"]:
            raise ValueError("chain and chain_sha256 differ in length or are empty")
        return header
    except (KeyError, TreeError, ValueError) as e:
        raise CheckpointError(f"{path}: its replay header is damaged ({e}); delete it") from None


def _verify_segment(seg: pathlib.Path, expected_sha: str, ckpt: pathlib.Path) -> None:
    if not seg.exists():
        raise CheckpointError(
            f"{ckpt} needs the replay segment {seg}, which is missing (deleted by hand?); resume from an earlier "
            "checkpoint or start a new run directory"
        )
    with _open(seg, SEGMENT_FORMAT) as f:
        sha = _check_digest(f, seg)
    if sha != expected_sha:
        raise CheckpointError(f"{seg} is not the replay segment {ckpt} was written with (checksum differs)")


def _load_replay(path: pathlib.Path, header: dict, replay) -> None:
    """Applies the chain's segments in order (base first) with ``replay.load_hdf5``."""
    for name in header["chain"]:
        seg = path.parent / "replay" / name
        with _open(seg, SEGMENT_FORMAT) as f:
            try:
                replay.load_hdf5(f["replay"])
            except ValueError as e:
                raise CheckpointError(
                    f"cannot restore the replay buffer of {path} from {seg.name}: {e}; build the buffer with the "
                    "checkpoint's config (num tasks, capacity, obs/action shapes, obs dtype)"
                ) from None
    if not np.array_equal(replay.added_counts(), header["added"]):
        raise CheckpointError(f"the replay chain of {path} ends at add counts {replay.added_counts().tolist()}, but "
                              f"the checkpoint lists {header['added'].tolist()}; delete it")
    _remember_chain(replay, path.parent, header)


def _plain(v):
    """Config values as plain Python (OmegaConf containers included) for comparison and messages."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(v):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:
        pass
    return v
