"""Observation normalisation by running statistics: SB3's VecNormalize(norm_obs=True), with one set of statistics
for all tasks (the default) or one per task (agent.builder.normalize_obs_per_task).

Why: MetaWorld's observations are positions in metres. On reach-v3 the hand and the goal vary by 3-8 cm (their
standard deviations), so the centimetre that decides success (within 5 cm of the goal) is a difference of about
0.01 in the networks' input. Divided by the running std it is a difference of 0.1-0.3.

Why one set for all tasks: per-task statistics centre every task's observations on the same point, so the shared
networks tell tasks apart by their one-hot alone; on MT10 they held button-press-topdown at 0.0 where one set
had it at 1.0 from 30k to 50k (docs/learning.md).

Statistics: the mean and variance of every observation the run collected, of all tasks or of that task (training
steps, the random initial steps included; evaluation episodes are not), merged one step at a time as SB3's
RunningMeanStd does (the count starts at 1e-4, the mean at 0, the variance at 1): each step's rows as one batch
for the one set, each row as a batch of one for its task's set. With one task the two are the same to the bit.
An observation becomes clip((obs - mean) / max(sqrt(var + 1e-8), std_floor), -10, 10). Replay keeps raw
observations and each sampled batch is normalised with the statistics of the moment, as SB3 does. The statistics
are buffers of the agent: they are in every checkpoint, a resumed run continues them exactly, and a policy loaded
for evaluation normalises as the run did.

Why a floor on the std (agent.builder.obs_std_floor, in the observation's units; SB3 has none): a dimension that
does not move while the agent explores has a running std that falls to 1e-4 (the 1e-8 epsilon). Button-press-
topdown's button height is one: its std over random actions is 1e-14. The first press then divides millimetres by
1e-4 and clips at -10, so a 2 mm press and the 7 cm that succeed give the networks the same input, and how far the
button went, which is what its reward and success measure, is lost. With a 1 cm floor a press reads as its depth
in centimetres. Dimensions that vary by more than the floor (hands, goals, objects moved in exploration) are
normalised as before, and constant ones stay at 0 either way. Off by default: on MT10 with per-task statistics
it did not help the task (docs/learning.md).
"""

import torch
from torch import nn

CLIP = 10.0
EPS = 1e-8
INITIAL_COUNT = 1e-4


class ObsNormalizer(nn.Module):
    def __init__(self, num_tasks: int, obs_dim: int, std_floor: float = 0.0, per_task: bool = True):
        """per_task=False: one set of statistics for all tasks (agent.builder.normalize_obs_per_task)."""
        super().__init__()
        self.std_floor = float(std_floor)
        self.per_task = bool(per_task)
        sets = num_tasks if per_task else 1
        # float64: a float32 mean drifts once the count reaches about 1e6 steps.
        self.register_buffer("count", torch.full((sets,), INITIAL_COUNT, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(sets, obs_dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(sets, obs_dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, obs: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Adds one observation per task: obs [rows, obs_dim] with distinct task_ids [rows]."""
        x = obs.to(torch.float64)
        # Chan et al.'s merge of a batch's moments into running ones (SB3's RunningMeanStd.update_from_moments):
        # per task each row is a batch of one for its own set; with one set all rows are one batch.
        if self.per_task:
            sets, batch_mean, batch_var, n = task_ids, x, 0.0, 1
        else:
            sets, n = slice(0, 1), x.shape[0]
            batch_mean, batch_var = x.mean(0, keepdim=True), x.var(0, unbiased=False, keepdim=True)
        count, mean, var = self.count[sets], self.mean[sets], self.var[sets]
        total = count + n
        delta = batch_mean - mean
        self.mean[sets] = mean + delta * n / total[:, None]
        m2 = var * count[:, None] + batch_var * n + delta.square() * (count * n / total)[:, None]
        self.var[sets] = m2 / total[:, None]
        self.count[sets] = total

    def forward(self, task_ids: torch.Tensor, *obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each obs [rows, obs_dim] of tasks task_ids [rows] -> normalised [rows, obs_dim], in float32 (float64 for
        float64 input). Several tensors of the same rows (obs, next_obs) share one lookup of the statistics."""
        dtype = torch.promote_types(obs[0].dtype, torch.float32)
        # One set: its [1, obs_dim] statistics broadcast over the rows, no gather.
        mean, var = (self.mean[task_ids], self.var[task_ids]) if self.per_task else (self.mean, self.var)
        mean, std = mean.to(dtype), (var + EPS).sqrt().clamp_min(self.std_floor).to(dtype)
        return tuple(((x.to(dtype) - mean) / std).clamp(-CLIP, CLIP) for x in obs)
