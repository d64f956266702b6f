"""Files and directories the project writes: their modes, and atomic publication.

A file is written under a temporary name beside its final path, fsynced, given FILE_MODE and renamed over the
final path, so a reader (or a job killed mid-write) sees the whole old file or the whole new one, never a part.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import pathlib
import secrets

FILE_MODE = 0o644  # whatever the umask: readable by the group's tools, never world-writable
DIR_MODE = 0o755


def temp_path(path, prefix: str = ".tmp-") -> pathlib.Path:
    """A fresh temporary name beside `path`. It never contains "tfevents": a TensorBoard watching the directory
    would read a half-written event file."""
    path = pathlib.Path(path)
    name = path.name.replace("tfevents", "tb")
    return path.with_name(f"{prefix}{os.getpid()}-{secrets.token_hex(4)}-{name}")


def remove_temp_files(directory, pattern: str) -> None:
    """Deletes the temporary files (temp_path's names) in `directory` of final names matching `pattern` (fnmatch):
    what a writer killed mid-write left. Only for directories whose files one process writes."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(".tmp-*-*-*"):
        final = p.name.split("-", 3)[3]  # .tmp-<pid>-<hex>-<final name>
        if fnmatch.fnmatch(final, pattern):
            p.unlink(missing_ok=True)


def fsync_dir(path) -> None:
    """Makes a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp, path) -> None:
    """Moves the finished file `tmp` to `path`: fsync, FILE_MODE, rename, fsync of the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    fsync_dir(pathlib.Path(path).parent)


@contextlib.contextmanager
def atomic_output(path):
    """Yields a temporary path beside `path` to write; on success it is published to `path`, on an exception
    deleted."""
    path = pathlib.Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_dirs(path) -> pathlib.Path:
    """Creates `path` and its missing parents with DIR_MODE (whatever the umask); raises OSError."""
    path = pathlib.Path(path)
    for p in reversed([path, *path.parents]):
        if not p.exists():
            try:
                p.mkdir()
            except FileExistsError:
                continue
            os.chmod(p, DIR_MODE)
    return path
