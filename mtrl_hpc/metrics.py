"""HDF5 metric log (readable while the run writes it), mtrl-style console lines, a progress bar for terminals.

``<run_dir>/metrics.h5``::

    attrs: format="mtrl_hpc.metrics", format_version=1
    /task_names            [T] str
    /train/step            [N] int64        one row per log("train", ...) call
    /train/<key>           [N] float64      scalar metrics (NaN where a row did not give the metric)
    /train/<task_key>      [N, T] float64   per-task metrics, columns in task_names order
    /eval/...              the same for log("eval", ...)

Every dataset exists from the start and the file is in SWMR mode, so other processes can read it while the
run appends: ``h5py.File(path, "r", swmr=True)``, then ``dataset.refresh()`` to see new rows (datasets of one
row may differ in length by one while a row is being appended: read ``min`` of the lengths). Each row is
flushed when logged. A reader that opens the log in the moment before the run switches it to SWMR mode (at
the run's start or resume) holds HDF5's file lock while it has the file open; the run waits up to
``LOCK_WAIT_S`` for it to close.

Resume: ``MetricsLog.resume(path, ..., last_step)`` keeps the rows with ``step <= last_step`` (the step of the
checkpoint the run resumes from) and drops the rest, so the resumed run continues without duplicated or
missing rows. Log the rows of step S before saving the checkpoint of step S.

TensorBoard (``tensorboard=True``, needs the ``tensorboard`` extra): the same rows are also written as event
files in the log's directory, tags ``<kind>/<key>`` and ``<kind>/<key>/<task name>``; a resume cuts them to
``last_step`` as well (mtrl_hpc.tensorboard_log).
"""

from __future__ import annotations

import errno
import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence

import h5py
import numpy as np

from mtrl_hpc import files
from mtrl_hpc.errors import short_error

FORMAT = "mtrl_hpc.metrics"
FORMAT_VERSION = 1
KINDS = ("train", "eval")
# How long opening the log for appending waits for other processes to release HDF5's file lock.
LOCK_WAIT_S = 60.0

# mtrl's metric set (config/metrics): scalar and per-task ("_env_index_" there) metrics.
TRAIN_KEYS = ("episode", "duration", "episode_reward", "success", "batch_reward", "actor_loss", "critic_loss",
              "alpha_loss", "alpha_value", "actor_entropy")
TRAIN_TASK_KEYS = ("episode_reward", "success", "alpha_value", "critic_loss", "actor_loss")
EVAL_KEYS = ("episode", "episode_reward", "success")
EVAL_TASK_KEYS = ("episode_reward", "success")

# Console abbreviations (mtrl's) and formats: "int", "float", "time" (seconds).
CONSOLE = {
    "episode": ("E", "int"), "step": ("S", "int"), "duration": ("D", "time"), "episode_reward": ("R", "float"),
    "success": ("Su", "float"), "batch_reward": ("BR", "float"), "actor_loss": ("ALOSS", "float"),
    "critic_loss": ("CLOSS", "float"), "alpha_loss": ("TLOSS", "float"), "alpha_value": ("TVAL", "float"),
    "actor_entropy": ("AENT", "float"), "updates_per_second": ("UPS", "float"), "fps": ("FPS", "float"),
}


class MetricsError(Exception):
    """The metric log cannot be created, opened, resumed or appended to; the message says what to do."""


def _tensorboard_module():
    try:
        from mtrl_hpc import tensorboard_log
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("tensorboard", "google"):  # google.protobuf comes with it
            raise
        raise MetricsError("logger.tensorboard=true needs the tensorboard package: "
                           "pip install 'mtrl_hpc[tensorboard]'") from None
    return tensorboard_log


def _open_for_appending(path: pathlib.Path) -> h5py.File:
    """Opens the log read-write, waiting up to ``LOCK_WAIT_S`` s while another process holds HDF5's file lock.

    A reader that opens the log (``h5py.File(path, "r", swmr=True)``, as a monitoring script does) before the
    writer has switched it to SWMR mode holds a shared lock for as long as it reads; the writer waits for it
    to let go instead of failing the run. A second writer is refused at once: HDF5 marks a file open for SWMR
    writing, and that error is not a lock error.
    """
    deadline = time.monotonic() + LOCK_WAIT_S
    delay = 0.01
    while True:
        try:
            return h5py.File(path, "r+", libver="latest")
        except OSError as e:
            cannot = f"cannot open {path} for appending ({short_error(e)})"
            if e.errno != errno.EAGAIN:
                raise MetricsError(f"{cannot}; is another run writing it?") from None
            if time.monotonic() >= deadline:
                raise MetricsError(f"{cannot}; another process has held it open for {LOCK_WAIT_S:g} s (a reader "
                                   "that keeps it open, or another run); close it or use a new run directory") from None
        time.sleep(delay)
        delay = min(2 * delay, 0.5)


def _task_key(key: str) -> str:
    return f"{key}_env_index_"


class MetricsLog:
    """Appends train/eval rows to ``path`` (see the module doc). Use as a context manager or call ``close()``.

    ``train_keys``/``eval_keys`` are scalar metrics; ``train_task_keys``/``eval_task_keys`` are per-task
    metrics, stored as ``<key>_env_index_`` datasets shaped [N, num_tasks] (mtrl's names). ``console``:
    print a line per ``log`` call. ``tensorboard``: also write TensorBoard event files beside ``path``.
    """

    def __init__(self, path, task_names: Sequence[str], train_keys: Sequence[str] = TRAIN_KEYS,
                 eval_keys: Sequence[str] = EVAL_KEYS, train_task_keys: Sequence[str] = TRAIN_TASK_KEYS,
                 eval_task_keys: Sequence[str] = EVAL_TASK_KEYS, console: bool = True, tensorboard: bool = False,
                 _append: bool = False, _last_step: int | None = None):
        self.path = pathlib.Path(path)
        self.task_names = [str(t) for t in task_names]
        self.console = console
        self.scalar_keys = {"train": _keys(train_keys), "eval": _keys(eval_keys)}
        self.task_keys = {"train": _keys(train_task_keys), "eval": _keys(eval_task_keys)}
        self._f = self._tb = None
        tb = _tensorboard_module() if tensorboard else None  # before any file is written
        files.remove_temp_files(self.path.parent, self.path.name)  # of a run killed while writing this log
        if not _append:
            if self.path.exists():
                raise MetricsError(
                    f"{self.path} already exists; resume it with MetricsLog.resume(..., last_step=<checkpoint step>) "
                    "or use a new run directory"
                )
            if tb is not None and _last_step is None and tb.event_files(self.path.parent):
                raise MetricsError(f"{self.path.parent} already holds TensorBoard event files; use a new run "
                                   "directory (or resume the run)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with files.atomic_output(self.path) as tmp:
                    with h5py.File(tmp, "w", libver="latest") as f:
                        self._create_layout(f)
            except OSError as e:
                raise MetricsError(f"cannot create {self.path} ({short_error(e)}); check the directory's permissions "
                                   "and free space") from None
        self._f = _open_for_appending(self.path)
        try:
            self._check_layout(self._f)
            self._f.swmr_mode = True
        except BaseException:
            self._f.close()
            raise
        self._ds = {kind: {name: self._f[kind][name] for name in self._f[kind]} for kind in KINDS}
        if tb is not None:
            try:
                self._tb = tb.EventWriter(self.path.parent, self.task_names, last_step=_last_step)
            except OSError as e:
                self.close()
                raise MetricsError(f"cannot write TensorBoard event files in {self.path.parent} ({short_error(e)}); "
                                   "check the directory's permissions and free space") from None

    # ------------------------------------------------------------------------------------- layout
    def _create_layout(self, f: h5py.File) -> None:
        T = len(self.task_names)
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.create_dataset("task_names", data=np.array(self.task_names, dtype=h5py.string_dtype("utf-8")))
        for kind in KINDS:
            g = f.create_group(kind)
            g.create_dataset("step", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.int64)
            for key in self.scalar_keys[kind]:
                g.create_dataset(key, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.float64, fillvalue=np.nan)
            for key in self.task_keys[kind]:
                g.create_dataset(_task_key(key), shape=(0, T), maxshape=(None, T), chunks=(max(1, 4096 // T), T),
                                 dtype=np.float64, fillvalue=np.nan)

    def _check_layout(self, f: h5py.File) -> None:
        if f.attrs.get("format") != FORMAT:
            raise MetricsError(f"{self.path} is not an mtrl_hpc metric log (format {f.attrs.get('format')!r}); "
                               "move it away or use another run directory")
        names = [n.decode() if isinstance(n, bytes) else n for n in f["task_names"][()].tolist()]
        if names != self.task_names:
            raise MetricsError(f"{self.path} logs the tasks {names}, this run has {self.task_names}; use a new run "
                               "directory for a different task set")
        for kind in KINDS:
            missing = [k for k in self.scalar_keys[kind] if k not in f[kind]]
            missing += [_task_key(k) for k in self.task_keys[kind] if _task_key(k) not in f[kind]]
            if missing:
                raise MetricsError(f"{self.path} has no {kind} datasets {missing}")

    # ------------------------------------------------------------------------------------- resume
    @classmethod
    def resume(cls, path, task_names: Sequence[str], train_keys: Sequence[str] = TRAIN_KEYS,
               eval_keys: Sequence[str] = EVAL_KEYS, train_task_keys: Sequence[str] = TRAIN_TASK_KEYS,
               eval_task_keys: Sequence[str] = EVAL_TASK_KEYS, *, last_step: int, console: bool = True,
               tensorboard: bool = False) -> "MetricsLog":
        """Reopens the log of a resumed run, keeping only rows with ``step <= last_step``.

        The kept rows are copied into a new file that atomically replaces the old one (this also recovers a
        log whose writer was killed). A missing log is created. With ``tensorboard`` the event files are cut
        to ``last_step`` too.
        """
        path = pathlib.Path(path)
        kwargs = dict(train_keys=train_keys, eval_keys=eval_keys, train_task_keys=train_task_keys,
                      eval_task_keys=eval_task_keys, console=console, tensorboard=tensorboard)
        if tensorboard:
            _tensorboard_module()  # fail before rewriting anything
        if not path.exists():
            return cls(path, task_names, **kwargs, _last_step=last_step)
        old = read_log(path)
        if old["task_names"] != [str(t) for t in task_names]:
            raise MetricsError(f"{path} logs the tasks {old['task_names']}, this run has {list(task_names)}; use a "
                               "new run directory for a different task set")
        log = cls.__new__(cls)
        log.task_names = [str(t) for t in task_names]
        log.scalar_keys = {"train": _keys(train_keys), "eval": _keys(eval_keys)}
        log.task_keys = {"train": _keys(train_task_keys), "eval": _keys(eval_task_keys)}
        try:
            with files.atomic_output(path) as tmp, h5py.File(tmp, "w", libver="latest") as f:
                # keep metrics the old log had and this run no longer declares
                for kind in KINDS:
                    for key, values in old[kind].items():
                        if key == "step":
                            continue
                        if values.ndim == 1 and key not in log.scalar_keys[kind]:
                            log.scalar_keys[kind].append(key)
                        if values.ndim == 2 and key.endswith("_env_index_"):
                            base = key[: -len("_env_index_")]
                            if base not in log.task_keys[kind]:
                                log.task_keys[kind].append(base)
                log._create_layout(f)
                for kind in KINDS:
                    keep = old[kind]["step"] <= last_step
                    n = int(keep.sum())
                    for name, ds in f[kind].items():
                        ds.resize(n, axis=0)
                        if name in old[kind] and n:
                            ds[...] = old[kind][name][keep]
        except OSError as e:
            raise MetricsError(
                f"cannot rewrite {path} for resuming ({short_error(e)}); check free space and permissions") from None
        return cls(path, task_names, train_keys=log.scalar_keys["train"], eval_keys=log.scalar_keys["eval"],
                   train_task_keys=log.task_keys["train"], eval_task_keys=log.task_keys["eval"], console=console,
                   tensorboard=tensorboard, _append=True, _last_step=last_step)

    # ------------------------------------------------------------------------------------- logging
    def log(self, kind: str, step: int, scalars: Mapping | None = None, per_task: Mapping | None = None) -> str:
        """Appends one row; returns (and, with ``console``, prints) its console line.

        ``scalars``: {key: float | int | 0-d tensor | numpy scalar}; ``per_task``: {key: array-like of
        num_tasks values (tensor, ndarray, list)}. Keys not given are NaN in this row.
        """
        if kind not in KINDS:
            raise MetricsError(f"kind must be one of {KINDS}, got {kind!r}")
        scalars, per_task = dict(scalars or {}), dict(per_task or {})
        scalars.pop("step", None)
        unknown = [k for k in scalars if k not in self.scalar_keys[kind]]
        unknown += [k for k in per_task if k not in self.task_keys[kind]]
        if unknown:
            raise MetricsError(
                f"log({kind!r}): unknown metrics {unknown}; declare them when creating the log (scalar: "
                f"{self.scalar_keys[kind]}, per task: {self.task_keys[kind]})"
            )
        T = len(self.task_names)
        values = {k: _scalar(v, k) for k, v in scalars.items()}
        rows = {}
        for k, v in per_task.items():
            arr = _array(v, k)
            if arr.shape != (T,):
                raise MetricsError(f"log({kind!r}): per-task metric {k!r} has shape {arr.shape}, expected ({T},) "
                                   "(one value per task, in task_names order)")
            rows[k] = arr
        ds = self._ds[kind]
        n = ds["step"].shape[0]
        try:
            for k in self.scalar_keys[kind]:
                d = ds[k]
                d.resize(n + 1, axis=0)
                d[n] = values.get(k, math.nan)
            for k in self.task_keys[kind]:
                d = ds[_task_key(k)]
                d.resize(n + 1, axis=0)
                d[n] = rows.get(k, np.full(T, np.nan))
            ds["step"].resize(n + 1, axis=0)
            ds["step"][n] = int(step)
            self._f.flush()
        except OSError as e:
            raise MetricsError(f"cannot append to {self.path} ({short_error(e)}); check free space") from None
        if self._tb is not None:
            try:
                self._tb.write(kind, int(step), values, rows)
            except OSError as e:
                raise MetricsError(f"cannot append to {self._tb.path} ({short_error(e)}); check free space") from None
        line = format_line(kind, int(step), values)
        if self.console:
            echo(line)
        return line

    def close(self) -> None:
        if getattr(self, "_tb", None) is not None:
            self._tb.close()
            self._tb = None
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _keys(keys) -> list[str]:
    out = []
    for k in keys:
        if k != "step" and k not in out:
            out.append(str(k))
    return out


def _scalar(v, key) -> float:
    if hasattr(v, "item") and callable(v.item):  # 0-d torch tensor / numpy scalar: read here, at log time
        try:
            v = v.item()
        except (RuntimeError, ValueError):
            raise MetricsError(f"metric {key!r}: expected a scalar, got a tensor/array of shape "
                               f"{tuple(getattr(v, 'shape', ()))}") from None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise MetricsError(f"metric {key!r}: expected a number, got {type(v).__name__}") from None


def _array(v, key) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().float().numpy()
    try:
        return np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise MetricsError(f"per-task metric {key!r}: expected numbers, got {type(v).__name__}") from None


# ============================================================================================ reading


def open_for_reading(path) -> h5py.File:
    """Opens a metric log read-only while it may still be written (SWMR)."""
    path = pathlib.Path(path)
    errors = []
    for kwargs in ({"swmr": True}, {}, {"locking": False}):
        try:
            f = h5py.File(path, "r", **kwargs)
        except OSError as e:
            errors.append(short_error(e))
            continue
        if f.attrs.get("format") != FORMAT:
            f.close()
            raise MetricsError(f"{path} is not an mtrl_hpc metric log")
        return f
    raise MetricsError(f"cannot read {path}: {errors[0]}; it is damaged or not an HDF5 file")


def read_log(path) -> dict:
    """{"task_names": [...], "train": {name: array}, "eval": {name: array}}, rows cut to complete ones."""
    with open_for_reading(path) as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["task_names"][()].tolist()]
        out = {"task_names": names}
        for kind in KINDS:
            datasets = {name: f[kind][name] for name in f[kind]}
            for d in datasets.values():
                d.refresh()
            n = min(d.shape[0] for d in datasets.values())
            out[kind] = {name: d[:n] for name, d in datasets.items()}
    return out


# ============================================================================================ console


def format_line(kind: str, step: int, values: Mapping[str, float]) -> str:
    """mtrl's console line: ``| train | E: 3 | S: 1500 | D: 12.1s | R: 512.3 | Su: 0.20 | ...``."""
    parts = [f"| {kind:<5}"]
    items = [("step", step)] + [(k, v) for k, v in values.items()]
    order = {k: i for i, k in enumerate(CONSOLE)}
    items.sort(key=lambda kv: order.get(kv[0], len(order)))
    for key, value in items:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        short, style = CONSOLE.get(key, (key, "float"))
        if style == "int":
            parts.append(f"{short}: {int(value)}")
        elif style == "time":
            parts.append(f"{short}: {value:.1f}s")
        else:
            parts.append(f"{short}: {_num(value)}")
    return " | ".join(parts) + " |"


def _num(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.3e}"


def echo(line: str) -> None:
    """Prints a line without breaking an active progress bar (tqdm.write clears and redraws the bars it holds;
    with none, it is a plain write); flushed (plain lines under SLURM)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class ProgressBar:
    """A tqdm bar on an interactive terminal; nothing at all when stdout is not a TTY (SLURM logs)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "steps", enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stdout.isatty()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stdout, dynamic_ncols=True,
                             unit="step", smoothing=0.05)

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
