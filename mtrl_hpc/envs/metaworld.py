"""All tasks of a MetaWorld multi-task benchmark, stepped together in one process.

One MetaWorld env instance per task; `step` takes a [num_tasks, action_dim] array and returns
[num_tasks, ...] arrays (task i is row i). All tasks share one episode clock.

Seeding. MetaWorld's `reset(seed=...)` ignores the seed and goals are fixed by `set_task`, so this
module owns the goal choice: the goals (MetaWorld `Task` objects, 50 per task) come from
`metaworld.MT10(seed=seed)` etc., and at each reset a seeded `numpy.random.Generator` picks one per
task ("train" mode) or goal `episode % num_goals` is used ("eval" mode); with goal_select "fixed" both modes
use one goal per task drawn from the seed alone (mtrl's protocol). Apart from the goal, a
MetaWorld v3 episode is a deterministic function of the actions: `reset` restores the whole MuJoCo
state (`mj_resetData`), and the envs' own RNGs (`np_random`, the spaces' RNGs) are seeded but not
used once `set_task` has fixed the episode's goal (they are still part of `get_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import metaworld
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from mtrl_hpc.envs import GOAL_SELECTS

BENCHMARKS = ("MT1", "MT10", "MT50")
MODES = ("train", "eval")
REWARD_FUNCTION_VERSIONS = ("v1", "v2")
STATE_FORMAT_VERSION = 2  # 2: goal_select and each task's goal order

# (benchmark, task_name, seed) -> (task names, env classes, goals per task). Goal lists are a
# deterministic function of the key and MetaWorld `Task`s are immutable, so the training and the
# evaluation env of a run share one build (MT10 about 6 s, MT50 about 27 s).
_BENCHMARK_CACHE: dict[tuple[str, str | None, int], tuple[tuple[str, ...], tuple[type, ...], tuple[tuple[Any, ...], ...]]] = {}


def clear_benchmark_cache() -> None:
    """Forget built benchmarks, so the next env object builds its goal lists again."""
    _BENCHMARK_CACHE.clear()


class StepResult(NamedTuple):
    obs: np.ndarray  # [T, obs_dim] float32
    reward: np.ndarray  # [T] float32
    terminated: np.ndarray  # [T] bool
    truncated: np.ndarray  # [T] bool
    success: np.ndarray  # [T] float32, info["success"] of this step


class EvalResult(NamedTuple):
    success_rate: np.ndarray  # [T] float64, fraction of episodes with success at any step
    mean_episode_reward: np.ndarray  # [T] float64, undiscounted episode return averaged over episodes
    episode_success: np.ndarray  # [T, E] float64, 1.0 if the success flag was 1 at any step
    episode_reward: np.ndarray  # [T, E] float64, undiscounted return of each episode
    episode_goal: np.ndarray  # [T, E] int64, index of the goal used in each episode


def _build_benchmark(benchmark: str, task_name: str | None, seed: int):
    key = (benchmark, task_name, seed)
    if key not in _BENCHMARK_CACHE:
        if benchmark == "MT1":
            bench = metaworld.MT1(task_name, seed=seed)
        else:
            bench = getattr(metaworld, benchmark)(seed=seed)
        names = tuple(bench.train_classes.keys())
        classes = tuple(bench.train_classes[n] for n in names)
        goals = tuple(tuple(t for t in bench.train_tasks if t.env_name == n) for n in names)
        _BENCHMARK_CACHE[key] = (names, classes, goals)
    return _BENCHMARK_CACHE[key]


def _bitgen_state_to_plain(state: dict) -> dict:
    """PCG64 state -> plain data (its 128-bit integers as decimal strings, which HDF5 can hold)."""
    if state["bit_generator"] != "PCG64":
        raise ValueError(f"expected a PCG64 bit generator, got {state['bit_generator']}")
    return {
        "bit_generator": "PCG64",
        "state": str(state["state"]["state"]),
        "inc": str(state["state"]["inc"]),
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def _as_str(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_str(value.item())
    return str(value)


def _plain_to_bitgen_state(plain: dict) -> dict:
    if _as_str(plain["bit_generator"]) != "PCG64":
        raise ValueError(f"expected a PCG64 bit generator state, got {plain['bit_generator']}")
    return {
        "bit_generator": "PCG64",
        "state": {"state": int(_as_str(plain["state"])), "inc": int(_as_str(plain["inc"]))},
        "has_uint32": int(plain["has_uint32"]),
        "uinteger": int(plain["uinteger"]),
    }


class MetaWorldMultiTaskEnv:
    """Batched MetaWorld MT1 / MT10 / MT50: every task stepped in lockstep, task i in row i.

    Args:
        benchmark: "MT1", "MT10" or "MT50".
        seed: seeds the goal lists (`metaworld.MT10(seed=seed)`), the goal choice at each reset and
            the underlying envs. Same seed and actions -> same trajectories. 0 <= seed < 2**32.
        task_name: the MetaWorld v3 task for MT1 (e.g. "pick-place-v3"); must be None otherwise.
        max_episode_steps: episode length; every task is truncated at this step. Any value >= 1
            (MetaWorld's own limit of 500 is raised to match).
        reward_function_version: "v2" (default) or "v1", passed to every MetaWorld env.
        mode: "train" picks a training goal per task at each reset (see goal_select); "eval" uses goal
            `episode % num_goals` (fixed order) and is the only mode `evaluate` runs in. Use a
            separate env object for evaluation so it never touches the training RNG stream.
            Build both with the same seed: the goal lists depend on it.
        goal_select: how "train" mode picks goals, one of GOAL_SELECTS: "random" (uniform at each
            reset), "pseudorandom" (each task runs through a seeded shuffle of all its goals,
            reshuffled after each pass) or "fixed" (mtrl's protocol: one goal per task, drawn from the
            seed alone, for every episode of both modes, so evaluation is on the goal trained on).
            "eval" mode ignores "random" and "pseudorandom".
    """

    obs_dim = 39
    action_dim = 4

    def __init__(
        self,
        benchmark: str,
        seed: int,
        task_name: str | None = None,
        max_episode_steps: int = 500,
        reward_function_version: str = "v2",
        mode: str = "train",
        goal_select: str = "random",
    ) -> None:
        if benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
        if benchmark == "MT1":
            if task_name not in ALL_V3_ENVIRONMENTS:
                raise ValueError(
                    f"MT1 needs task_name, one of the MetaWorld v3 tasks; got {task_name!r}. "
                    f"Valid: {', '.join(ALL_V3_ENVIRONMENTS)}"
                )
        elif task_name is not None:
            raise ValueError(f"task_name is only used by MT1; got task_name={task_name!r} for {benchmark}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if goal_select not in GOAL_SELECTS:
            raise ValueError(f"unknown goal_select {goal_select!r}; valid: {', '.join(GOAL_SELECTS)}")
        if reward_function_version not in REWARD_FUNCTION_VERSIONS:
            raise ValueError(
                f"unknown reward_function_version {reward_function_version!r}; "
                f"valid: {', '.join(REWARD_FUNCTION_VERSIONS)}"
            )
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer)) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")

        self.benchmark = benchmark
        self.seed = int(seed)
        self.mode = mode
        self.goal_select = goal_select
        self.max_episode_steps = int(max_episode_steps)
        self.reward_function_version = reward_function_version

        names, classes, goals = _build_benchmark(benchmark, task_name, self.seed)
        self.task_names: list[str] = list(names)
        self.num_tasks = len(names)
        self.goals: tuple[tuple[Any, ...], ...] = goals  # per task row: its MetaWorld Task objects
        self._num_goals = np.array([len(g) for g in goals], dtype=np.int64)

        # The third child is new with "fixed"; spawn(3)'s first two are spawn(2)'s, so the other streams are unchanged.
        goal_seq, env_seq, fixed_seq = np.random.SeedSequence(self.seed).spawn(3)
        self._goal_rng = np.random.Generator(np.random.PCG64(goal_seq))
        # Drawn whatever goal_select is, so a train and an eval env of one seed agree on it without shared state.
        self.fixed_goal = np.random.Generator(np.random.PCG64(fixed_seq)).integers(0, self._num_goals)
        self.fixed_goal.setflags(write=False)  # per task row: its goal under goal_select "fixed"
        self._envs = []
        for cls, env_seed in zip(classes, env_seq.generate_state(self.num_tasks, dtype=np.uint32)):
            env = cls(reward_function_version=reward_function_version)
            env.seed(int(env_seed))
            env.max_path_length = self.max_episode_steps  # MetaWorld raises past its own limit
            self._envs.append(env)
        self._episode = 0  # resets done so far
        self._t = -1  # steps into the current episode; -1 until reset()
        self._goal_idx = np.zeros(self.num_tasks, dtype=np.int64)
        # pseudorandom: each task's current pass through its goals, drawn when a pass starts
        self._goal_order = [np.zeros(0, dtype=np.int64) for _ in range(self.num_tasks)]

        T = self.num_tasks
        self._act = np.empty((T, self.action_dim), dtype=np.float32)
        self._obs = np.empty((T, self.obs_dim), dtype=np.float32)
        self._rew = np.empty(T, dtype=np.float32)
        self._term = np.empty(T, dtype=bool)
        self._succ = np.empty(T, dtype=np.float32)

    @property
    def envs(self) -> tuple:
        """The underlying MetaWorld env objects, in task row order."""
        return tuple(self._envs)

    @property
    def goal_indices(self) -> np.ndarray:
        """Index into `goals[i]` of the goal of the current episode, per task."""
        return self._goal_idx.copy()

    @property
    def episode(self) -> int:
        """Number of resets so far."""
        return self._episode

    def reset(self) -> np.ndarray:
        """Start a new episode in every task; returns obs [num_tasks, obs_dim] float32."""
        if not self._envs:
            raise RuntimeError("the env is closed")
        if self.goal_select == "fixed":
            goal_idx = self.fixed_goal
        elif self.mode == "train" and self.goal_select == "random":
            goal_idx = self._goal_rng.integers(0, self._num_goals)
        elif self.mode == "train":
            position = self._episode % self._num_goals
            for i in np.flatnonzero(position == 0):
                self._goal_order[i] = self._goal_rng.permutation(self._num_goals[i])
            goal_idx = np.array([order[p] for order, p in zip(self._goal_order, position)], dtype=np.int64)
        else:
            goal_idx = self._episode % self._num_goals
        obs = self._obs
        for i, env in enumerate(self._envs):
            env.set_task(self.goals[i][goal_idx[i]])
            obs[i] = env.reset()[0]
        self._goal_idx = goal_idx
        self._episode += 1
        self._t = 0
        return obs.copy()

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every task with its row of `actions` ([num_tasks, action_dim], clipped to [-1, 1]).

        `truncated` is True for every task at step `max_episode_steps`; then call `reset()`.
        MetaWorld never sets `terminated`; it is passed through as the envs report it.
        """
        if self._t < 0:
            raise RuntimeError("call reset() before step()")
        if self._t >= self.max_episode_steps:
            raise RuntimeError(f"the episode was truncated at {self.max_episode_steps} steps; call reset()")
        actions = np.asarray(actions)
        if actions.shape != self._act.shape:
            raise ValueError(f"actions must have shape {self._act.shape}, got {actions.shape}")
        act = self._act
        np.clip(actions, -1.0, 1.0, out=act, casting="unsafe")
        obs, rew, term, succ = self._obs, self._rew, self._term, self._succ
        for i, env in enumerate(self._envs):
            o, r, te, _, info = env.step(act[i])
            obs[i] = o
            rew[i] = r
            term[i] = te
            succ[i] = info["success"]
        self._t += 1
        truncated = np.full(self.num_tasks, self._t >= self.max_episode_steps)
        return StepResult(obs.copy(), rew.copy(), term.copy(), truncated, succ.copy())

    def evaluate(self, act_fn: Callable[[np.ndarray], np.ndarray], num_episodes: int,
                 on_step: Callable[[int], None] | None = None) -> EvalResult:
        """MetaWorld's protocol: `num_episodes` episodes per task, all tasks in lockstep.

        Episode e of every task uses goal `e % num_goals` (the same goals on every call), or with
        goal_select "fixed" the task's fixed goal, and counts as a success if the success flag was 1 at
        any step. `act_fn(obs [T, obs_dim] float32)`
        returns actions [T, action_dim]. Only in mode "eval"; leaves the env needing `reset()`.
        `on_step(e)`, if given, is called after the reset of episode e and after each of its steps, when
        `envs` hold the state just reached (a video recorder renders them there).
        """
        if self.mode != "eval":
            raise RuntimeError("evaluate() needs an env built with mode='eval' (a separate object from the training env)")
        if num_episodes < 1:
            raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
        T, E = self.num_tasks, int(num_episodes)
        ep_success = np.zeros((T, E))
        ep_reward = np.zeros((T, E))
        ep_goal = np.zeros((T, E), dtype=np.int64)
        self._episode = 0
        for e in range(E):
            obs = self.reset()
            ep_goal[:, e] = self._goal_idx
            alive = np.ones(T, dtype=bool)
            success, reward = ep_success[:, e], ep_reward[:, e]
            if on_step is not None:
                on_step(e)
            while True:
                res = self.step(act_fn(obs))
                if on_step is not None:
                    on_step(e)
                reward += np.where(alive, res.reward, 0.0)
                np.maximum(success, np.where(alive, res.success, 0.0), out=success)
                alive &= ~res.terminated
                if res.truncated[0] or not alive.any():
                    break
                obs = res.obs
        self._t = -1
        return EvalResult(ep_success.mean(axis=1), ep_reward.mean(axis=1), ep_success, ep_reward, ep_goal)

    def get_state(self) -> dict:
        """Everything needed to continue from the next episode boundary, as plain data.

        The training loop checkpoints at episode boundaries (after truncation, before `reset()`):
        a new env object built with the same arguments, given this state, produces from its next
        `reset()` on exactly what this env would have. The MuJoCo state inside an episode is not
        captured; called mid-episode, the restored env continues with the next episode.
        Values are ints, strings and nested dicts of these (no pickle), so they fit in HDF5.
        """
        tasks = {}
        for name, env, order in zip(self.task_names, self._envs, self._goal_order):
            tasks[name] = {
                "np_random": _bitgen_state_to_plain(env.np_random.bit_generator.state),
                "action_space": _bitgen_state_to_plain(env.action_space.np_random.bit_generator.state),
                "observation_space": _bitgen_state_to_plain(env.observation_space.np_random.bit_generator.state),
                "goal_space": _bitgen_state_to_plain(env.goal_space.np_random.bit_generator.state),
                "goal_order": ",".join(map(str, order.tolist())),
            }
        return {
            "format_version": STATE_FORMAT_VERSION,
            "benchmark": self.benchmark,
            "task_names": ",".join(self.task_names),
            "seed": self.seed,
            "mode": self.mode,
            "goal_select": self.goal_select,
            "max_episode_steps": self.max_episode_steps,
            "reward_function_version": self.reward_function_version,
            "episode": self._episode,
            "episode_step": max(self._t, 0),
            "goal_rng": _bitgen_state_to_plain(self._goal_rng.bit_generator.state),
            "tasks": tasks,
        }

    def set_state(self, state: dict) -> None:
        """Restore `get_state()` output (also as read back from HDF5); call `reset()` next."""
        if int(state["format_version"]) != STATE_FORMAT_VERSION:
            raise ValueError(f"env state format {int(state['format_version'])} is not the one this mtrl_hpc reads "
                             f"({STATE_FORMAT_VERSION}); continue it with the mtrl_hpc that wrote it, or start a new run")
        expected = {
            "benchmark": self.benchmark,
            "task_names": ",".join(self.task_names),
            "seed": str(self.seed),
            "mode": self.mode,
            "goal_select": self.goal_select,
            "max_episode_steps": str(self.max_episode_steps),
            "reward_function_version": self.reward_function_version,
        }
        for key, value in expected.items():
            if _as_str(state[key]) != value:
                raise ValueError(f"env state has {key}={_as_str(state[key])!r}, this env has {value!r}")
        self._goal_rng.bit_generator.state = _plain_to_bitgen_state(state["goal_rng"])
        for name, env in zip(self.task_names, self._envs):
            task = state["tasks"][name]
            env.np_random.bit_generator.state = _plain_to_bitgen_state(task["np_random"])
            env.action_space.np_random.bit_generator.state = _plain_to_bitgen_state(task["action_space"])
            env.observation_space.np_random.bit_generator.state = _plain_to_bitgen_state(task["observation_space"])
            env.goal_space.np_random.bit_generator.state = _plain_to_bitgen_state(task["goal_space"])
        self._goal_order = [np.array([int(g) for g in _as_str(state["tasks"][name]["goal_order"]).split(",") if g],
                                     dtype=np.int64) for name in self.task_names]
        self._episode = int(state["episode"])
        self._t = -1

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs = []
        self._t = -1

    def __enter__(self) -> MetaWorldMultiTaskEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
