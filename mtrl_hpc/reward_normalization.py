"""Reward normalisation by a running standard deviation, per task, as mtrl did it.

mtrl built its MetaWorld envs with `should_perform_reward_normalization=True`, which wraps each task's env in
garage's NormalizedEnv: before a reward r is returned, the exponential moving mean and variance (weight 1e-3)
are updated with it, and the env returns r / (sqrt(variance) + 1e-8). The mean starts at 0, the variance at 1.
Here the same rule scales the rewards that enter the replay buffer (what the critic learns from); the logged
episode rewards stay MetaWorld's own. The statistics are part of every checkpoint, so a resumed run scales
its next rewards exactly as the uninterrupted run would.
"""

import numpy as np


class RewardNormalizer:
    def __init__(self, num_tasks: int, ema_weight: float = 1e-3, eps: float = 1e-8):
        self.ema_weight = float(ema_weight)
        self.eps = float(eps)
        self.mean = np.zeros(num_tasks)
        self.var = np.ones(num_tasks)

    def __call__(self, reward: np.ndarray) -> np.ndarray:
        """Updates the statistics with one reward per task ([num_tasks]) and returns them scaled (float32)."""
        r = np.asarray(reward, dtype=np.float64)
        w = self.ema_weight
        self.mean = (1 - w) * self.mean + w * r
        self.var = (1 - w) * self.var + w * np.square(r - self.mean)
        return (r / (np.sqrt(self.var) + self.eps)).astype(np.float32)

    def state_dict(self) -> dict:
        return {"mean": self.mean.copy(), "var": self.var.copy()}

    def load_state_dict(self, state: dict) -> None:
        mean, var = np.asarray(state["mean"], dtype=np.float64), np.asarray(state["var"], dtype=np.float64)
        if mean.shape != self.mean.shape or var.shape != self.var.shape:
            raise ValueError(f"reward normaliser state is for {mean.shape[0]} tasks, this run has {self.mean.shape[0]}")
        self.mean, self.var = mean.copy(), var.copy()
