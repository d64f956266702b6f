"""TensorBoard event files beside the HDF5 metric log (``MetricsLog(..., tensorboard=True)``).

Each logged row becomes one event at the row's step holding the values the row was given (keys a row did not
give are absent, not NaN): tag ``<kind>/<key>`` for scalars (``train/critic_loss``, ``eval/success``) and
``<kind>/<key>/<task name>`` per task (``eval/success/reach-v3``). Event files lie directly in the run
directory, so ``tensorboard --logdir <sweep dir>`` shows one TensorBoard run per job. Each row is flushed when
logged.

Resume (``last_step`` given): every event file in the directory is cut to the events with ``step <=
last_step`` (rewritten atomically; a truncated last record of a killed writer is dropped), so no reader sees
a step twice, whether or not it honours purge markers. The run then appends to a new event file that starts
with a ``SessionLog.START`` at ``last_step + 1`` (what ``SummaryWriter(purge_step=...)`` writes): a
TensorBoard that had already read the cut events discards them on its next reload.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.summary.writer.record_writer import RecordWriter

from mtrl_hpc import files

FILE_VERSION = "brain.Event:2"  # version 2: readers purge on SessionLog.START


def is_event_file(path: pathlib.Path) -> bool:
    # TensorBoard's own test (io_wrapper.IsTensorFlowEventsFile): "tfevents" in the file name
    return "tfevents" in path.name and path.is_file()


def event_files(run_dir) -> list[pathlib.Path]:
    """The run's event files in the order TensorBoard reads them (by name)."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if is_event_file(p)), key=lambda p: p.name)


def read_records(path) -> tuple[list[bytes], int]:
    """(serialized records, bytes they span) of a TFRecord file, up to its first truncated or damaged record."""
    data = pathlib.Path(path).read_bytes()
    records, pos = [], 0
    while pos + 12 <= len(data):
        header = data[pos:pos + 8]
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header):
            break
        (n,) = struct.unpack("<Q", header)
        end = pos + 12 + n + 4
        if end > len(data):
            break
        payload = data[pos + 12:pos + 12 + n]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
            break
        records.append(payload)
        pos = end
    return records, pos


def cut_after(run_dir, last_step: int) -> None:
    """Keeps only events with ``step <= last_step`` (and each file's version header) in the run's event files.

    A file left with nothing but its header is removed; a file that loses nothing is not touched, so a
    TensorBoard reading it keeps its place."""
    for path in event_files(run_dir):
        records, span = read_records(path)
        kept, has_data = [], False
        for raw in records:
            event = event_pb2.Event.FromString(raw)
            if event.HasField("file_version"):
                kept.append(raw)
            elif event.step <= last_step:
                kept.append(raw)
                has_data = True
        if not has_data:
            path.unlink()
            continue
        if len(kept) == len(records) and span == path.stat().st_size:
            continue
        with files.atomic_output(path) as tmp, _create(tmp) as fh:
            writer = RecordWriter(fh)
            for raw in kept:
                writer.write(raw)


def _create(path: pathlib.Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, files.FILE_MODE)
    os.fchmod(fd, files.FILE_MODE)  # the same mode as metrics.h5, whatever the umask
    return os.fdopen(fd, "wb")


def _new_path(run_dir: pathlib.Path) -> pathlib.Path:
    name = f"events.out.tfevents.{time.time_ns() // 1000:016d}.{socket.gethostname()}.{os.getpid()}"
    existing = [p.name for p in event_files(run_dir)]
    # readers go through a directory's files in name order and never back: the new file must sort last
    # (a clock behind the previous job's, on another node, would otherwise hide the resumed curve)
    if existing and name <= existing[-1]:
        name = existing[-1] + ".1"
    return run_dir / name


class EventWriter:
    """Appends one event per metric row to a new event file in ``run_dir`` (see the module doc).

    ``last_step``: the run resumes from the checkpoint of this step (-1: from the start): existing event files
    are cut to it first, and the new file starts with a purge marker at ``last_step + 1``."""

    def __init__(self, run_dir, task_names: Sequence[str], last_step: int | None = None):
        self.run_dir = pathlib.Path(run_dir)
        self.task_names = [str(t) for t in task_names]
        files.remove_temp_files(self.run_dir, "events.out.tb.*")  # of a run killed while cutting its event files
        if last_step is not None:
            cut_after(self.run_dir, int(last_step))
        self.path = _new_path(self.run_dir)
        self._writer = RecordWriter(_create(self.path))
        now = time.time()
        self._write(event_pb2.Event(wall_time=now, file_version=FILE_VERSION,
                                    source_metadata=event_pb2.SourceMetadata(writer="mtrl_hpc")))
        if last_step is not None:
            self._write(event_pb2.Event(wall_time=now, step=int(last_step) + 1,
                                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._writer.flush()

    def write(self, kind: str, step: int, scalars: Mapping[str, float],
              per_task: Mapping[str, np.ndarray]) -> None:
        """One event at ``step``: ``scalars`` {key: float}, ``per_task`` {key: [num_tasks] values}."""
        values = [summary_pb2.Summary.Value(tag=f"{kind}/{k}", simple_value=float(v)) for k, v in scalars.items()]
        for k, row in per_task.items():
            values += [summary_pb2.Summary.Value(tag=f"{kind}/{k}/{name}", simple_value=float(v))
                       for name, v in zip(self.task_names, row)]
        if values:
            self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)))
            self._writer.flush()

    def _write(self, event: event_pb2.Event) -> None:
        self._writer.write(event.SerializeToString())

    def close(self) -> None:
        if not self._writer.closed:
            self._writer.close()
