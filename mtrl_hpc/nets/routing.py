"""Rows to per-task parameters by task id: the layout per-task layers (heads) multiply in.

A per-task layer holds one weight matrix per task and multiplies [tasks, n, in] @ [tasks, in, out]. `TaskRouting`
places each row of a batch at (its task, its rank among that task's rows) in that layout and brings the results
back in row order, so any batch works: equal or unequal shares, tasks missing, rows in any order.

- Rows grouped by task in equal shares (replay batches sampled in equal shares, acting with one row per task):
  the layout is a reshape of the batch, no copy.
- Otherwise the rows are scattered into a zero-padded [tasks, max rows of a task, in] layout and gathered back.
  Padding rows cost compute but never reach an output or a gradient.

Built from a replay `Batch` it uses the counts the sampler planned on the host and the offsets it already put on
the device, so routing makes no host sync in the update. Built from bare task ids it counts them (one sync).
"""

from __future__ import annotations

import torch


class TaskRouting:
    def __init__(self, task_ids: torch.Tensor, num_tasks: int, counts: list[int] | None = None,
                 offsets: torch.Tensor | None = None):
        """task_ids: int64 [rows]. counts (host) and offsets (device, [num_tasks + 1] cumulative counts) describe
        rows grouped by task in ascending order; without them the layout is computed from task_ids."""
        task_ids = task_ids.reshape(-1)
        self.num_tasks = num_tasks
        self.rows = task_ids.numel()
        grouped = counts is not None
        if counts is None:
            counts = torch.bincount(task_ids, minlength=num_tasks).tolist()  # host sync: off the update path
        if len(counts) != num_tasks:
            raise ValueError(f"task routing: {len(counts)} task counts for {num_tasks} tasks")
        if sum(counts) != self.rows:
            raise ValueError(f"task routing: the task counts sum to {sum(counts)}, the batch has {self.rows} rows")
        self.per_task = max(counts)
        self.equal = grouped and all(c == self.per_task for c in counts)
        self.dest = None
        if not self.equal:
            self.dest = _destinations(task_ids, counts, offsets if grouped else None, self.per_task)

    @classmethod
    def from_batch(cls, batch, num_tasks: int) -> TaskRouting:
        counts = getattr(batch, "task_counts", None)
        if counts is None:
            return cls(batch.task_ids, num_tasks)
        return cls(batch.task_ids, num_tasks, counts.tolist(), batch.task_offsets)

    @classmethod
    def one_row_per_task(cls, task_ids: torch.Tensor, num_tasks: int) -> TaskRouting:
        """Acting and evaluation: row t is task t."""
        return cls(task_ids, num_tasks, [1] * num_tasks, None) if task_ids.numel() == num_tasks else cls(task_ids, num_tasks)

    def to_tasks(self, x: torch.Tensor) -> torch.Tensor:
        """[members, rows, f] -> [members * tasks, per_task, f] (member-major, as heads are stacked)."""
        members, rows, f = x.shape
        if rows != self.rows:
            raise ValueError(f"task routing was built for {self.rows} rows, got {rows}")
        if self.equal:
            return x.reshape(members * self.num_tasks, self.per_task, f)
        padded = x.new_zeros(members, self.num_tasks * self.per_task, f)
        padded = padded.index_copy(1, self.dest, x)
        return padded.reshape(members * self.num_tasks, self.per_task, f)

    def to_rows(self, y: torch.Tensor, members: int) -> torch.Tensor:
        """[members * tasks, per_task, f] -> [members, rows, f] in the batch's row order."""
        f = y.shape[-1]
        y = y.reshape(members, self.num_tasks * self.per_task, f)
        return y if self.equal else y.index_select(1, self.dest)


def _destinations(task_ids, counts, offsets, per_task) -> torch.Tensor:
    """Index of each row in the flattened [tasks * per_task] layout: task * per_task + rank within its task."""
    device = task_ids.device
    if offsets is None:  # any order: rank by a stable sort
        start = torch.tensor([0] + counts, device=device).cumsum(0)
        sorted_ids, order = torch.sort(task_ids, stable=True)
        rank_sorted = torch.arange(task_ids.numel(), device=device) - start[sorted_ids]
        rank = torch.empty_like(rank_sorted).index_copy_(0, order, rank_sorted)
    else:  # grouped ascending: the rank is the distance from the task's first row
        rank = torch.arange(task_ids.numel(), device=device) - offsets[task_ids]
    return task_ids * per_task + rank
