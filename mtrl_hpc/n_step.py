"""n-step returns: the transitions that enter replay when `agent.builder.n_step` > 1.

Each env step of the batched env (one row per task) goes into a window of the last n steps. Once the window
holds n steps, its oldest start s_t becomes one replay row:

    (s_t, a_t, R = sum_{k<n} discount^k r_{t+k}, s_{t+n}, terminated)

and the critic bootstraps it with discount^n (SACAgent.discount holds discount^n). A step that terminates ends the
sum there (later rewards of the window are not added) and the row is stored as terminated. Episodes end by
truncation: at the reset the window is dropped, so the last n - 1 starts of each episode are not stored (they
would need a shorter bootstrap horizon than the loss applies). Checkpoints fall on episode boundaries, where the
window is dropped anyway: it is never part of a checkpoint.
The entropy bonus enters at the bootstrap state s_{t+n} only, not at the intermediate steps.
"""

import numpy as np


class NStepWindow:
    def __init__(self, n: int, discount: float):
        if n < 2:
            raise ValueError(f"n-step returns need n >= 2, got {n}")
        self.n = int(n)
        self.weights = float(discount) ** np.arange(self.n)  # discount^k for the k-th reward of the window
        self.steps: list[tuple] = []

    def clear(self) -> None:
        self.steps.clear()

    def push(self, obs, action, reward, next_obs, terminated):
        """Adds one step (arrays with one row per task). Returns the replay rows it completes, as
        (obs, action, n-step reward float32 [T], next_obs, terminated bool [T]), or None while the window fills."""
        self.steps.append((obs, action, np.asarray(reward, dtype=np.float64), next_obs, np.asarray(terminated, dtype=bool)))
        if len(self.steps) < self.n:
            return None
        rewards = np.stack([s[2] for s in self.steps])  # [n, T]
        terminated = np.stack([s[4] for s in self.steps])
        # A reward counts if no earlier step of the window terminated (the terminating step's own reward counts).
        alive = np.cumprod(np.concatenate([np.ones_like(terminated[:1]), ~terminated[:-1]]), axis=0).astype(bool)
        n_step_reward = (self.weights[:, None] * rewards * alive).sum(0).astype(np.float32)
        first, last = self.steps[0], self.steps[-1]
        self.steps.pop(0)
        return first[0], first[1], n_step_reward, last[3], terminated.any(0)
