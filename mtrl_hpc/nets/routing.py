"""Rows to per-task parameters by task id: the layout per-task layers (heads) multiply in.

A per-task layer holds one weight matrix per task and multiplies [tasks, n, in] @ [tasks, in, out]. `TaskRouting`
places each row of a batch at (its task, its rank among that task's rows) in that layout and brings the results
back in row order, so any batch works: equal or unequal shares, tasks missing, rows in any order.

- Rows grouped by task in equal shares (replay batches sampled in equal shares, acting with one row per task):
  the layout is a reshape of the batch, no copy.
- Otherwise the rows are scattered into a zero-padded [tasks, max rows of a task, in] layout and gathered back.
  Padding rows cost compute but never reach an output or a gradient.
- Rows grouped by task in unequal shares on the CPU in float32 (replay batches with task weights): layers may
  instead multiply the rows where they are, one group of rows per (member, task), with torch._grouped_mm
  (`row_groups`): no padding rows, about the time of equal shares (widths that are not a multiple of 4, the
  op's alignment, are padded with zero features).

Built from a replay `Batch` it uses the counts the sampler planned on the host and the offsets it already put on
the device, so routing makes no host sync in the update. Built from bare task ids it counts them (one sync).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

# torch._grouped_mm needs each matrix's row stride to be a multiple of 16 bytes: 4 float32 features.
_GROUPED_MM_ALIGN = 4


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
        self.counts = counts
        self._can_group = grouped and not self.equal and task_ids.device.type == "cpu" and _cpu_grouped_mm_works()
        self._row_groups: dict[int, RowGroups] = {}

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

    def row_groups(self, x: torch.Tensor) -> RowGroups | None:
        """For x [members, rows, f] in this batch's row order: its rows as (member, task) groups for grouped
        matmul, or None where the padded layout is used (equal shares, rows not grouped, not float32 on the CPU,
        or inside torch.compile, which does not trace torch._grouped_mm on the CPU)."""
        if not self._can_group or x.dtype != torch.float32 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        members = x.shape[0]
        if members not in self._row_groups:
            self._row_groups[members] = RowGroups(self.counts * members, x.device)
        return self._row_groups[members]

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


class RowGroups:
    """Rows stored member-major and, within a member, grouped by task ascending (a grouped batch's own order):
    group g = member * tasks + task is the rows of stack g of a per-task layer. Layers multiply each group by its
    own stack with one torch._grouped_mm over all groups, and read per-stack biases and gains by row."""

    def __init__(self, counts: list[int], device):
        sizes = torch.tensor(counts, dtype=torch.int64, device=device)
        self.offsets = sizes.cumsum(0).to(torch.int32)  # end row of each group, as torch._grouped_mm takes them
        self.stack_of_row = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes)

    def per_row(self, stacked: torch.Tensor) -> torch.Tensor:
        """[stacks, 1, f] -> [rows, f]: each row's own stack's vector."""
        return stacked.reshape(stacked.shape[0], -1).index_select(0, self.stack_of_row)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [rows, in] @ weight[stack of row] + bias[stack of row], for weight [stacks, in, out]."""
        fan_in, fan_out = weight.shape[1:]
        pad_in, pad_out = -fan_in % _GROUPED_MM_ALIGN, -fan_out % _GROUPED_MM_ALIGN
        if pad_in:
            x, weight = F.pad(x, (0, pad_in)), F.pad(weight, (0, 0, 0, pad_in))
        if pad_out:
            weight = F.pad(weight, (0, pad_out))
        y = torch._grouped_mm(x.contiguous(), weight, offs=self.offsets)
        if y.requires_grad:
            y.register_hook(_contiguous)  # its backward refuses the stride-0 gradients a sum or an expand sends
        if pad_out:
            y = y[:, :fan_out]
        return y + self.per_row(bias)


@functools.cache
def _cpu_grouped_mm_works() -> bool:
    """Whether this torch has torch._grouped_mm for float32 on the CPU (torch 2.13 has; older ones may not)."""
    try:
        torch._grouped_mm(torch.ones(2, 4), torch.ones(1, 4, 4), offs=torch.tensor([2], dtype=torch.int32))
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):
        return False
    return True


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


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
