"""Stop a run whose training has diverged, before it saves anything.

Checked at every episode boundary, before that boundary's evaluation and checkpoint, from the episode's mean
losses (already read from the device for the metric log) and one fused norm over the agent's parameters: a
non-finite loss or parameter, or a mean critic loss above `experiment.critic_loss_ceiling`, raises `Diverged`.
The run then ends with status 4, which neither the run's own requeue nor slurm/train.sbatch retries: a
diverged run would diverge again from the same checkpoint.
"""

import pathlib

import numpy as np
import torch

from mtrl_hpc import checkpoint

# The episode means a diverged update shows first.
LOSSES = ("critic_loss", "actor_loss", "alpha_loss")


class Diverged(Exception):
    """Training produced non-finite numbers or crossed the critic-loss ceiling; the message says where."""


class DivergenceGuard:
    def __init__(self, agent: torch.nn.Module, critic_loss_ceiling: float | None, run_dir):
        self.agent = agent
        self.ceiling = None if critic_loss_ceiling is None else float(critic_loss_ceiling)
        self.run_dir = pathlib.Path(run_dir)

    def check(self, means: dict, first_step: int, last_step: int) -> None:
        """means: the episode's mean update metrics (host numbers); raises Diverged."""
        where = f"in the updates of steps {first_step}-{last_step}"
        for name in LOSSES:
            if name in means and not np.all(np.isfinite(means[name])):
                self._stop(f"{name} became {float(np.max(means[name]))} {where}")
        loss = means.get("critic_loss")
        if self.ceiling is not None and loss is not None and float(loss) > self.ceiling:
            self._stop(f"critic_loss={float(loss):.4g} crossed experiment.critic_loss_ceiling={self.ceiling:g} {where}")
        named = [(n, p) for n, p in self.agent.named_parameters()]
        finite = torch.stack(torch._foreach_norm([p.detach() for _, p in named])).isfinite().cpu().numpy()
        if not finite.all():
            self._stop(f"parameter {named[int(np.argmin(finite))][0]} became non-finite {where}")

    def _stop(self, what: str) -> None:
        latest = checkpoint.latest_path(self.run_dir)
        saved = (f"the last checkpoint, {latest}, was written before it" if latest is not None
                 else "no checkpoint was written before it")
        raise Diverged(f"training diverged: {what}; {saved} and nothing after it was saved. docs/learning.md "
                       "lists what was tried against it (e.g. agent.critic.layer_norm=true, lower learning rates); "
                       "experiment.critic_loss_ceiling=null removes the ceiling")
