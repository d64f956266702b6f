"""Task-stratified replay buffer, resident on the training device (thin face of csrc/replay).

Storage: one tensor per field shaped ``[tasks, capacity_per_task, ...]`` on ``device`` (obs and next_obs in
``obs_dtype``: float32, float16 or bfloat16; action, reward and not_done in float32). The fields are views
into one allocation holding a record per transition (obs, next_obs, action, reward, not_done side by side), so
each row ``field[t, i]`` is contiguous and the rows are strided. Each task is a ring buffer; ``added[t]``
counts the transitions ever written to task t, so its write cursor is ``added[t] % capacity_per_task`` and
its fill count ``min(added[t], capacity_per_task)``.

``add`` writes one env step (one row per entry of ``task_ids``; repeated ids write consecutive ring slots in
row order). ``done`` means *terminated*: pass ``terminated``, not ``terminated | truncated``; the buffer
stores ``not_done = 1 - done``.

``sample(batch_size, task_weights=None)`` returns a :class:`Batch` whose rows are grouped by task in
ascending task order (task 0's rows first). Rules, in order:

* **Eligible tasks.** Tasks that hold no data yet get 0 rows (with weights: so do tasks of weight 0). The
  batch is spread over the eligible tasks only. Sampling raises ``ValueError`` when no task is eligible
  ("no task has data yet" / "no task with data has a positive weight").
* **Equal shares** (no weights). With ``n`` eligible tasks each gets ``batch_size // n`` rows; the
  ``r = batch_size % n`` remaining rows go one each to ``r`` consecutive eligible tasks (ascending, wrapping)
  starting at eligible position ``(sample_counter * r) % n``. The remainder thus rotates deterministically
  and every task gets the same number of rows on average. When all tasks hold data and ``batch_size`` is a
  multiple of ``num_tasks``, ``obs.view(num_tasks, batch_size // num_tasks, -1)`` is per task.
* **Weights** (``task_weights``: ``num_tasks`` finite non-negative numbers, not necessarily normalised;
  read on the host). Rows are apportioned by largest remainder: eligible task t gets
  ``floor(B * w_t / W)`` rows (``W`` = total eligible weight) and the remaining rows go to the largest
  fractional parts, ties to the lower task id.
* **Rows within a task** are uniform over the task's filled rows ``[0, fill count)`` (after wrap-around
  every row is filled). Batch rows 2p and 2p + 1 of sample call number c share one
  ``Philox4x32-10(key = seed, counter = (p low, p high, c low, c high))``: row 2p takes output words 0 and 1,
  row 2p + 1 words 2 and 3, as 64 bits ``r`` (first word low), and the row is ``floor(r * fill_count / 2**64)``.
  CPU and CUDA compute the same indices; ``sample_counter`` is part of the state.

The returned tensors are float32 (task_ids, indices int64; ``indices`` are rows within the task's storage)
and are **reused by the next call of the same batch size**: clone what must outlive it. On CUDA, ``sample``
does not synchronise with the host. ``add`` reads task ids on the host (task ids given as a CUDA tensor cost
one sync). Its inputs may be reused by the caller as soon as it returns: host arrays and pageable tensors go to
the device by a non-blocking copy (CUDA stages pageable memory before the call returns), pinned tensors by a
synchronous one. numpy inputs in any byte order and with any strides are accepted on every device.

Performance notes: a sampled transition is one record of a few adjacent cache lines (336 bytes for MT10
shapes), not rows of five arrays of hundreds of MB; ``sample`` on a large buffer is bound by how many cache
lines per second the memory system delivers, so the lines a row touches set its speed. On the CPU, storage is
allocated with transparent huge pages where Linux allows it. ``sample`` splits the batch over torch's intra-op
threads (chunks of at least 512 rows), prefetches rows a few ahead, and computes the Philox draws of eight
rows at once (four Philox calls in AVX2 lanes where the CPU has AVX2). ``add`` costs one kernel call for the
whole env step. Both call the ops through the direct entries of ``mtrl_hpc._C`` (csrc/bindings.cpp), which
skip torch.ops' per-call argument parsing.

State: ``state_dict()`` (the storage tensors themselves, not copies, plus counters) / ``load_state_dict``;
``save_hdf5(group, since=None)`` / ``load_hdf5(group)`` with open h5py groups: a full save holds every filled
row; a delta save (``since`` = the add counts ``added_counts()`` returned at the previous save) holds only the
rows added after it. Loading the full save and then each delta in order reproduces ``state_dict()`` exactly.
Saving copies rows to the host and writes them one block of records at a time, so it needs a few MB beyond the
buffer, not a second copy of it.
"""

from __future__ import annotations

import ctypes
import math
import sys
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from mtrl_hpc import _C, ops  # noqa: F401  (ops registers torch.ops.mtrl_hpc.*)

_MASK64 = (1 << 64) - 1
_FORMAT = "mtrl_hpc.replay/1"
# The sampling rule of the saved buffer (module docstring): 2 = two batch rows per Philox call. Groups saved
# before the attribute existed drew one row per call.
_DRAW_RULE = 2
_OBS_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_FIELDS = ("obs", "action", "reward", "next_obs", "not_done")


class Batch(NamedTuple):
    obs: torch.Tensor  # [B, *obs_shape] float32
    action: torch.Tensor  # [B, *action_shape] float32
    reward: torch.Tensor  # [B, 1] float32
    next_obs: torch.Tensor  # [B, *obs_shape] float32
    not_done: torch.Tensor  # [B, 1] float32 (0 where the episode terminated)
    task_ids: torch.Tensor  # [B] int64, ascending
    indices: torch.Tensor  # [B] int64, row within the task's storage
    # How the sampler split the batch: rows per task (CPU int64 [T]) and their cumulative offsets (device int64
    # [T + 1]). None for batches built by hand; per-task layers then count the task ids themselves.
    task_counts: torch.Tensor | None = None
    task_offsets: torch.Tensor | None = None

    def sampled(self) -> tuple[torch.Tensor, ...]:
        """The seven tensors the sample op writes (obs .. indices), in its argument order."""
        return tuple(self[:7])


def _signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def _shape(value, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a tuple of positive ints, got {value!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")
    return shape


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


_SAVE_BLOCK_ROWS = 16384  # save_hdf5 copies rows out in blocks of this many records (a few MB: they stay in cache)
_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Asks Linux for transparent huge pages under a large CPU tensor before its pages are touched, so that
    random row reads over hundreds of MB miss the TLB less (how much that buys depends on the host). Best effort:
    does nothing where madvise or THP is unavailable."""
    if t.nbytes < 4 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = (t.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        stop = (t.data_ptr() + t.nbytes) & ~(_HUGE_PAGE - 1)
        if stop > start:
            libc.madvise(start, stop - start, _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


def _plain(x: np.ndarray) -> np.ndarray:
    """``x`` in native byte order without negative strides: torch.from_numpy and torch.as_tensor refuse both."""
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x if all(s >= 0 for s in x.strides) else np.ascontiguousarray(x)


def _storage(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype)
    _advise_huge_pages(t)
    return t.zero_()


class ReplayBuffer:
    """Device-resident ring buffer per task with stratified Philox sampling; see the module docstring."""

    def __init__(self, num_tasks: int, capacity_per_task: int, obs_shape: tuple, action_shape: tuple,
                 device="cpu", seed: int = 0, obs_dtype: torch.dtype = torch.float32):
        self.num_tasks = _positive_int(num_tasks, "num_tasks")
        self.capacity_per_task = _positive_int(capacity_per_task, "capacity_per_task")
        self.obs_shape = _shape(obs_shape, "obs_shape")
        self.action_shape = _shape(action_shape, "action_shape")
        if obs_dtype not in _OBS_DTYPES:
            raise ValueError(f"obs_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {obs_dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.device = torch.device(device)
        self.obs_dtype = obs_dtype
        self.seed = int(seed) & _MASK64
        self.sample_counter = 0
        T, C, dev = self.num_tasks, self.capacity_per_task, self.device
        # One record of float32 words per transition: obs and next_obs (obs_dtype, padded together to a whole
        # word), action, reward, not_done. A sampled row is then a few adjacent cache lines in one page instead
        # of lines in five arrays, which is what bounds sample() on a large buffer.
        O, A = math.prod(self.obs_shape), math.prod(self.action_shape)
        obs_words = -(-2 * O * obs_dtype.itemsize // 4)
        self._records = _storage((T, C, obs_words + A + 2), torch.float32, dev)
        both_obs = self._records[:, :, :obs_words].view(obs_dtype)
        self.obs = both_obs[:, :, :O].unflatten(2, self.obs_shape)
        self.next_obs = both_obs[:, :, O:2 * O].unflatten(2, self.obs_shape)
        self.action = self._records[:, :, obs_words:obs_words + A].unflatten(2, self.action_shape)
        self.reward = self._records[:, :, obs_words + A]
        self.not_done = self._records[:, :, obs_words + A + 1]
        self.added = torch.zeros(T, dtype=torch.int64, device=dev)
        # Host copy of `added`, so planning a batch never reads the device. On the CPU it is `added` itself.
        self._on_cpu = dev.type == "cpu"
        self._added_host = self.added.numpy() if self._on_cpu else np.zeros(T, dtype=np.int64)
        self._outputs: dict[int, Batch] = {}  # per batch size; sample() refills and returns the same tensors
        self._equal_plans: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (counts, offsets) by (batch, start)
        self._eligible = np.zeros(0, dtype=np.int64)  # tasks holding data, ascending
        # Direct entries of torch.ops.mtrl_hpc.replay_add/replay_sample (csrc/bindings.cpp): same kernels,
        # without torch.ops' per-call argument parsing.
        self._add_op = _C.replay_add
        self._sample_op = _C.replay_sample

    # ---------------------------------------------------------------- writing
    def _tensor(self, x, name: str) -> torch.Tensor:
        """Inputs as tensors on the buffer's device; integers become float32 (floats and bools pass as they are:
        the op converts while writing). The caller may overwrite its arrays as soon as add() returns."""
        if self._on_cpu and type(x) is np.ndarray and x.dtype.kind in "fb" and x.flags.c_contiguous \
                and x.dtype.isnative:
            return torch.from_numpy(x)
        if isinstance(x, torch.Tensor):
            if not (x.is_floating_point() or x.dtype in (torch.bool, torch.uint8) or x.is_complex()):
                x = x.float()
            if x.device == self.device:
                return x
            # A non-blocking copy from pinned memory reads it after add() has returned, when the caller may
            # already be refilling it (and one into host memory may still be running when the op reads it):
            # copy synchronously. From pageable memory CUDA stages the bytes before the call returns.
            blocking = self._on_cpu or (x.device.type == "cpu" and x.is_pinned())
            return x.to(self.device, non_blocking=not blocking)
        if isinstance(x, np.ndarray) and x.dtype.kind == "i":
            x = x.astype(np.float32)
        if isinstance(x, np.ndarray) and x.dtype.kind in "fbu":
            t = torch.from_numpy(_plain(x))
            return t if self._on_cpu else t.to(self.device, non_blocking=True)  # pageable: staged at once
        try:
            return torch.as_tensor(_plain(np.asarray(x)), device=self.device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"add(): {name} must be a tensor or numpy array, got {type(x).__name__}: {error}") from None

    def add(self, obs, action, reward, next_obs, done, task_ids) -> None:
        """Writes one row per entry of ``task_ids``: obs/next_obs [N, *obs_shape], action [N, *action_shape],
        reward/done [N] (or [N, 1]); done = terminated only. Torch tensors or numpy arrays."""
        if type(task_ids) is np.ndarray and task_ids.dtype == np.int64 and task_ids.flags.c_contiguous:
            ids_np = task_ids
        else:
            ids_np = task_ids.detach().cpu().numpy() if isinstance(task_ids, torch.Tensor) else np.asarray(task_ids)
            if ids_np.dtype.kind not in "iu":
                raise ValueError(f"add(): task_ids must hold integers (one task id per row), got dtype {ids_np.dtype}")
            ids_np = np.ascontiguousarray(ids_np, dtype=np.int64)
        t = self._tensor
        # Task ids stay on the host: the op checks their range there, without a device sync.
        self._add_op(self.obs, self.action, self.reward, self.next_obs, self.not_done, self.added, t(obs, "obs"),
                     t(action, "action"), t(reward, "reward"), t(next_obs, "next_obs"), t(done, "done"),
                     torch.from_numpy(ids_np))
        if not self._on_cpu:
            self._added_host += np.bincount(ids_np.reshape(-1), minlength=self.num_tasks)  # range-checked by the op
        if len(self._eligible) < self.num_tasks:
            self._refresh_eligible()

    def _refresh_eligible(self) -> None:
        eligible = np.flatnonzero(self._added_host > 0)
        if len(eligible) != len(self._eligible):
            self._eligible = eligible
            self._equal_plans.clear()

    # ---------------------------------------------------------------- sampling
    def _outputs_for(self, batch_size: int) -> Batch:
        out = self._outputs.get(batch_size)
        if out is None:
            B, dev, f32 = batch_size, self.device, torch.float32
            out = Batch(torch.empty((B, *self.obs_shape), dtype=f32, device=dev),
                       torch.empty((B, *self.action_shape), dtype=f32, device=dev),
                       torch.empty((B, 1), dtype=f32, device=dev),
                       torch.empty((B, *self.obs_shape), dtype=f32, device=dev),
                       torch.empty((B, 1), dtype=f32, device=dev),
                       torch.empty(B, dtype=torch.int64, device=dev),
                       torch.empty(B, dtype=torch.int64, device=dev))
            self._outputs[batch_size] = out
        return out

    def _offsets_tensor(self, counts: np.ndarray) -> torch.Tensor:
        offsets = np.zeros(self.num_tasks + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        # Pageable host memory is staged at once by a non-blocking copy: no wait for the device.
        return torch.from_numpy(offsets).to(self.device, non_blocking=True)

    def _equal_plan(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows per task, CPU int64 [T]; their cumulative offsets on the device, [T + 1]) of an equal-share batch."""
        n = len(self._eligible)
        if n == 0:
            raise ValueError("sample(): no task has data yet; add transitions before sampling")
        rem = batch_size % n
        start = (self.sample_counter * rem) % n if rem else 0
        key = (batch_size, start)
        plan = self._equal_plans.get(key)
        if plan is None:
            counts = np.zeros(self.num_tasks, dtype=np.int64)
            counts[self._eligible] = batch_size // n
            counts[self._eligible[(start + np.arange(rem)) % n]] += 1
            plan = self._equal_plans[key] = (torch.from_numpy(counts), self._offsets_tensor(counts))
        return plan

    def task_counts(self, batch_size: int, task_weights=None) -> np.ndarray:
        """Rows per task that the next ``sample(batch_size, task_weights)`` call will draw (host int64)."""
        if task_weights is None:
            return self._equal_plan(batch_size)[0].numpy().copy()
        return self._weighted_counts(batch_size, task_weights)

    def _weighted_counts(self, batch_size: int, task_weights) -> np.ndarray:
        if isinstance(task_weights, torch.Tensor):
            task_weights = task_weights.detach().cpu().numpy()
        try:
            w = np.asarray(task_weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"sample(): task_weights must be {self.num_tasks} numbers, got {task_weights!r}") from None
        if w.shape != (self.num_tasks,):
            raise ValueError(f"sample(): task_weights must have shape ({self.num_tasks},) (one weight per task), "
                             f"got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"sample(): task_weights must be finite and >= 0, got {w.tolist()}")
        w = np.where(self._added_host > 0, w, 0.0)
        total = w.sum()
        if total <= 0:
            if not np.any(self._added_host > 0):
                raise ValueError("sample(): no task has data yet; add transitions before sampling")
            raise ValueError("sample(): no task with data has a positive weight; give a positive weight to at least "
                             f"one of the tasks holding data {np.flatnonzero(self._added_host > 0).tolist()}")
        quota = batch_size * (w / total)
        counts = np.floor(quota).astype(np.int64)
        rest = batch_size - int(counts.sum())
        if rest > 0:
            order = np.lexsort((np.arange(self.num_tasks), -(quota - counts)))  # largest fraction, then lower id
            counts[order[:rest]] += 1
        return counts

    def sample(self, batch_size: int, task_weights=None) -> Batch:
        """Draws ``batch_size`` transitions grouped by task (ascending); see the module docstring for the rules."""
        if type(batch_size) is not int:
            if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
                raise ValueError(f"sample(): batch_size must be a positive int, got {batch_size!r}")
            batch_size = int(batch_size)
        if batch_size <= 0:
            raise ValueError(f"sample(): batch_size must be a positive int, got {batch_size!r}")
        if task_weights is None:
            counts, offsets = self._equal_plan(batch_size)
        else:
            weighted = self._weighted_counts(batch_size, task_weights)
            counts, offsets = torch.from_numpy(weighted), self._offsets_tensor(weighted)
        out = self._outputs_for(batch_size)
        self._sample_op(self.obs, self.action, self.reward, self.next_obs, self.not_done, self.added, offsets,
                        _signed64(self.seed), _signed64(self.sample_counter), *out.sampled())
        out = out._replace(task_counts=counts, task_offsets=offsets)
        self.sample_counter += 1
        return out

    # ---------------------------------------------------------------- size
    def sizes(self) -> torch.Tensor:
        """Per-task fill counts (CPU int64 tensor, from the host mirror: no device sync)."""
        return torch.from_numpy(np.minimum(self._added_host, self.capacity_per_task))

    @property
    def storage_bytes(self) -> int:
        """Bytes the stored transitions occupy (the records of every task, whether filled or not)."""
        return self._records.nbytes

    def __len__(self) -> int:
        return int(np.minimum(self._added_host, self.capacity_per_task).sum())

    @property
    def ready(self) -> bool:
        """True once every task holds data (from then on equal shares cover all tasks)."""
        return len(self._eligible) == self.num_tasks

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The storage tensors themselves (no copies) and the counters; ``load_state_dict`` restores exactly."""
        return {
            "obs": self.obs, "action": self.action, "reward": self.reward, "next_obs": self.next_obs,
            "not_done": self.not_done, "added": self.added,
            "sample_counter": self.sample_counter, "seed": self.seed,
            "num_tasks": self.num_tasks, "capacity_per_task": self.capacity_per_task,
        }

    def _check_layout(self, where: str, num_tasks: int, capacity: int) -> None:
        if (num_tasks, capacity) != (self.num_tasks, self.capacity_per_task):
            raise ValueError(f"{where}: the saved buffer has {num_tasks} tasks x {capacity} rows but this one has "
                             f"{self.num_tasks} x {self.capacity_per_task}; build the buffer with the saved sizes")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in (*_FIELDS, "added", "sample_counter", "seed") if k not in state]
        if missing:
            raise ValueError(f"load_state_dict(): missing keys {missing}")
        self._check_layout("load_state_dict()", int(state.get("num_tasks", self.num_tasks)),
                           int(state.get("capacity_per_task", self.capacity_per_task)))
        for name in (*_FIELDS, "added"):
            src, dst = state[name], getattr(self, name)
            if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dst.shape):
                shape = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
                raise ValueError(f"load_state_dict(): {name} must be a tensor of shape {tuple(dst.shape)}, got {shape}")
        added = state["added"].detach().cpu().to(torch.int64)
        if bool((added < 0).any()):
            raise ValueError("load_state_dict(): added must be >= 0")
        for name in (*_FIELDS, "added"):
            src = state[name]
            if src.data_ptr() != getattr(self, name).data_ptr():
                getattr(self, name).copy_(src)
        self._set_counters(added.numpy(), int(state["sample_counter"]), int(state["seed"]))

    def _set_counters(self, added: np.ndarray, sample_counter: int, seed: int) -> None:
        self._added_host[...] = added
        self.sample_counter = sample_counter
        self.seed = seed & _MASK64
        self._eligible = np.zeros(0, dtype=np.int64)
        self._equal_plans.clear()
        self._refresh_eligible()

    # ---------------------------------------------------------------- HDF5
    def added_counts(self) -> np.ndarray:
        """Per-task counts of transitions ever added (a host int64 copy; no device sync)."""
        return self._added_host.copy()

    def _check_since(self, since) -> np.ndarray:
        if since is None:
            return np.zeros(self.num_tasks, dtype=np.int64)
        since = np.asarray(since)
        if since.shape != (self.num_tasks,) or since.dtype.kind not in "iu":
            raise ValueError(f"save_hdf5(): since must be {self.num_tasks} integer add counts (one per task), got "
                             f"shape {since.shape} dtype {since.dtype}")
        since = since.astype(np.int64)
        if np.any(since < 0) or np.any(since > self._added_host):
            raise ValueError(f"save_hdf5(): since {since.tolist()} must lie between 0 and the buffer's add counts "
                             f"{self._added_host.tolist()}")
        return since

    def _runs(self, since: np.ndarray, added: np.ndarray) -> list[tuple[int, int, int]]:
        """(task, start slot, count) of the rows each task added after ``since``, oldest first; a task that
        added ``capacity_per_task`` rows or more contributes its whole ring."""
        C, runs = self.capacity_per_task, []
        for t in np.flatnonzero(added > since).tolist():
            n = int(min(added[t] - since[t], C))
            start = int((added[t] - n) % C)
            first = min(n, C - start)
            runs.append((t, start, first))
            if n > first:
                runs.append((t, 0, n - first))
        return runs

    def _disk_dtype(self):
        return {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[self.obs_dtype]

    def _rows_numpy(self, name: str, t: int, start: int, stop: int) -> np.ndarray:
        rows = getattr(self, name)[t, start:stop].detach()
        if rows.dtype == torch.bfloat16:
            rows = rows.view(torch.int16)
        rows = np.ascontiguousarray(rows.cpu().numpy())  # a field's rows are strided within the records
        return rows.view(np.uint16) if rows.dtype == np.int16 else rows

    def save_hdf5(self, group, since=None, digest=None) -> int:
        """Writes into the open h5py ``group`` the rows each task added after the per-task add counts ``since``
        (int [num_tasks], e.g. ``added_counts()`` at an earlier save; None: every filled row) and the small state
        (add counts, sample counter, seed, layout). Returns the number of rows written per field.

        Group layout: attributes ``format``, ``num_tasks``, ``capacity_per_task``, ``obs_shape``,
        ``action_shape``, ``obs_dtype``, ``seed``, ``sample_counter``, ``draw_rule`` (the sampling rule: loading
        a group of another rule warns); datasets ``since`` and ``added`` [T] int64,
        ``runs`` [R, 3] int64 (task, start slot, count) and one dataset per field holding the rows of all runs
        in order (bfloat16 obs as uint16 bits). ``digest`` (an ``mtrl_hpc.hdf5_tree.Digest``, optional) hashes
        every written object as it is written.
        """
        since = self._check_since(since)
        added = self._added_host.copy()
        runs = self._runs(since, added)
        n_rows = sum(r[2] for r in runs)
        prefix = group.name.rstrip("/")
        a = group.attrs
        a["format"] = _FORMAT
        a["draw_rule"] = _DRAW_RULE
        a["num_tasks"], a["capacity_per_task"] = self.num_tasks, self.capacity_per_task
        a["obs_shape"], a["action_shape"] = np.array(self.obs_shape), np.array(self.action_shape)
        a["obs_dtype"] = _OBS_DTYPES[self.obs_dtype]
        a["seed"], a["sample_counter"] = np.uint64(self.seed), np.uint64(self.sample_counter & _MASK64)
        if digest is not None:
            digest.add(group.name, group, [])
        for name, data in (("since", since), ("added", added), ("runs", np.array(runs, dtype=np.int64).reshape(-1, 3))):
            ds = group.create_dataset(name, data=data)
            if digest is not None:
                digest.add(f"{prefix}/{name}", ds, [data])
        trailing = {"obs": self.obs_shape, "next_obs": self.obs_shape, "action": self.action_shape,
                    "reward": (), "not_done": ()}
        datasets, streams = {}, {}
        for name in _FIELDS:
            dtype = self._disk_dtype() if name in ("obs", "next_obs") else np.float32
            datasets[name] = group.create_dataset(name, shape=(n_rows, *trailing[name]), dtype=dtype)
            if digest is not None:  # hashed by the digest's worker threads while HDF5 writes the same bytes
                streams[name] = digest.stream(f"{prefix}/{name}", datasets[name])
        # Block by block, all five fields of a block at once: every record is read from memory once, and the
        # host holds one block of rows (a few MB), not a copy of the buffer.
        off = 0
        for t, start, count in runs:
            for lo in range(start, start + count, _SAVE_BLOCK_ROWS):
                hi = min(lo + _SAVE_BLOCK_ROWS, start + count)
                for name in _FIELDS:
                    rows = self._rows_numpy(name, t, lo, hi)
                    datasets[name][off:off + hi - lo] = rows
                    if name in streams:
                        streams[name].update(rows)
                off += hi - lo
        for stream in streams.values():
            stream.close()
        return n_rows

    def load_hdf5(self, group) -> None:
        """Applies a group written by ``save_hdf5``: its rows and counters. A group saved with ``since=None``
        replaces the whole contents; a group saved with ``since`` (a delta) requires this buffer's add counts to
        equal ``since``. Applying a full group and then its deltas in order reproduces ``state_dict()`` exactly."""
        a = group.attrs
        if a.get("format") != _FORMAT:
            raise ValueError(f"load_hdf5(): group {group.name!r} holds no replay buffer (format attribute "
                             f"{a.get('format')!r}, expected {_FORMAT!r})")
        self._check_layout("load_hdf5()", int(a["num_tasks"]), int(a["capacity_per_task"]))
        draw_rule = int(a.get("draw_rule", 1))
        if draw_rule != _DRAW_RULE:
            warnings.warn(f"load_hdf5(): group {group.name!r} was saved by a version of mtrl_hpc that drew rows by "
                          f"sampling rule {draw_rule}, and this one uses rule {_DRAW_RULE}: the rows and counters "
                          "are restored exactly, but the batches sampled from here on differ from the ones that "
                          "version would have drawn", RuntimeWarning, stacklevel=2)
        for name, want in (("obs_shape", self.obs_shape), ("action_shape", self.action_shape)):
            if tuple(int(v) for v in a[name]) != want:
                raise ValueError(f"load_hdf5(): saved {name} is {tuple(int(v) for v in a[name])} but this buffer has "
                                 f"{want}")
        saved_dtype = str(a["obs_dtype"])
        if saved_dtype != _OBS_DTYPES[self.obs_dtype]:
            raise ValueError(f"load_hdf5(): saved obs_dtype is {saved_dtype} but this buffer has "
                             f"{_OBS_DTYPES[self.obs_dtype]}; build the buffer with the saved obs dtype")
        since = group["since"][...].astype(np.int64)
        added = group["added"][...].astype(np.int64)
        runs = [tuple(r) for r in group["runs"][...].astype(np.int64).tolist()]
        if since.shape != (self.num_tasks,) or added.shape != (self.num_tasks,) or np.any(since > added):
            raise ValueError(f"load_hdf5(): group {group.name!r} has inconsistent add counts (since "
                             f"{since.tolist()}, added {added.tolist()})")
        full = not since.any()
        if not full and not np.array_equal(since, self._added_host):
            raise ValueError(f"load_hdf5(): group {group.name!r} holds the rows added after the add counts "
                             f"{since.tolist()}, but this buffer's add counts are {self._added_host.tolist()}; apply "
                             "the full save and the earlier deltas first, in order")
        if runs != self._runs(since, added):
            raise ValueError(f"load_hdf5(): group {group.name!r} lists rows that do not match its add counts")
        n_rows = sum(r[2] for r in runs)
        for name in _FIELDS:  # checked before any row is applied
            want = (n_rows, *getattr(self, name).shape[2:])
            want_dtype = np.dtype(self._disk_dtype() if name in ("obs", "next_obs") else np.float32)
            if tuple(group[name].shape) != want or group[name].dtype != want_dtype:
                raise ValueError(f"load_hdf5(): {group.name}/{name} is {group[name].dtype} {tuple(group[name].shape)}, "
                                 f"expected {want_dtype} {want}")
        for name in _FIELDS:
            dst, ds = getattr(self, name), group[name]
            if full:  # rows beyond the fill count are zero, as in a fresh buffer
                for t in range(self.num_tasks):
                    dst[t, min(int(added[t]), self.capacity_per_task):].zero_()
            off = 0
            for t, start, count in runs:  # one run at a time: at most capacity_per_task rows in host memory
                rows = ds[off:off + count]
                data = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16) if rows.dtype == np.uint16 else \
                    torch.from_numpy(rows)
                dst[t, start:start + count].copy_(data)
                off += count
        self.added.copy_(torch.from_numpy(added))
        self._set_counters(added, int(a["sample_counter"]), int(a["seed"]))
