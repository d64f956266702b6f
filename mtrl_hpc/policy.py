"""A trained policy from a checkpoint, for evaluation and notebooks.

    policy = mtrl_hpc.load_policy("outputs/<id>/<date>")    # a run directory (its newest good checkpoint) or a .h5 file
    actions = policy.act(obs, task_ids)                       # numpy [rows, 39], [rows] -> numpy [rows, 4]

`act` is the actor's deterministic action, tanh of the Gaussian's mean: what the training loop evaluates.
Only the checkpoint's HDF5 datasets and its config text are read; no code from the file is run.
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mtrl_hpc import checkpoint
from mtrl_hpc.checkpoint import CheckpointError
from mtrl_hpc.errors import short_error


def find_checkpoint(path) -> pathlib.Path:
    """`path` itself if it is a file, else the newest checkpoint of run directory `path` whose file verifies (a
    policy does not need the replay segments, so those are not checked).

    Unlike `checkpoint.find_latest_good` this never deletes anything: the run may still be writing. Each
    newer checkpoint that does not verify is skipped with a RuntimeWarning. Raises CheckpointError when
    there is none that verifies."""
    path = pathlib.Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run directory or a checkpoint file (.h5)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a run directory nor a checkpoint file")
    ckdir = checkpoint.checkpoint_dir(path)
    # Names carry the step in 12 digits, so name order is step order.
    candidates = sorted(ckdir.glob("step_" + "[0-9]" * 12 + ".h5"), reverse=True) if ckdir.is_dir() else []
    if not candidates:
        raise CheckpointError(f"{path} holds no checkpoints ({ckdir}/step_*.h5); give a run directory that has "
                              "written one, or a checkpoint file")
    skipped = []
    for candidate in candidates:
        try:
            # The policy needs the file alone: a damaged replay segment does not make its actor unusable.
            checkpoint.verify(candidate, replay=False)
        except checkpoint.CheckpointVersionError:
            raise
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        for reason in skipped:
            warnings.warn(f"skipped a newer checkpoint: {reason}", RuntimeWarning, stacklevel=2)
        return candidate
    raise CheckpointError(f"none of the {len(candidates)} checkpoints in {ckdir} verifies; the newest: {skipped[0]}")


class Policy:
    """The actor of a checkpoint. Attributes: path, step, config (the run's resolved config), task_names
    (task id i is task_names[i]), num_tasks, obs_dim, action_dim, device, agent."""

    def __init__(self, agent, config, task_names: list[str], obs_dim: int, action_dim: int, path, step: int,
                 device: str):
        self.agent, self.config, self.task_names = agent, config, list(task_names)
        self.num_tasks, self.obs_dim, self.action_dim = len(self.task_names), obs_dim, action_dim
        self.path, self.step, self.device = pathlib.Path(path), int(step), device

    def task_id(self, name: str) -> int:
        try:
            return self.task_names.index(name)
        except ValueError:
            raise ValueError(f"unknown task {name!r}; this policy's tasks: {', '.join(self.task_names)}") from None

    def act(self, obs, task_ids) -> np.ndarray:
        """Deterministic actions: obs [rows, obs_dim] and task_ids [rows] (ints in [0, num_tasks)) give
        [rows, action_dim] float32; one obs [obs_dim] with one int task id gives [action_dim]."""
        obs = np.asarray(obs, dtype=np.float32)
        ids = np.asarray(task_ids)
        single = obs.ndim == 1
        if single:
            obs, ids = obs[None], ids.reshape(1)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs must have shape [rows, {self.obs_dim}] or [{self.obs_dim}], got {obs.shape}")
        if ids.shape != (obs.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"task_ids must be {obs.shape[0]} integers (one per obs row), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_tasks):
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks}), got {ids.min()}..{ids.max()}")
        actions = self.agent.act(torch.as_tensor(obs, device=self.device),
                                 torch.as_tensor(ids, dtype=torch.int64, device=self.device), sample=False)
        actions = actions.cpu().numpy()
        return actions[0] if single else actions


# What a run from before each agent.builder key existed did, where today's default differs or may change: it fed
# its networks raw observations, divided them by the std alone, and kept one set of statistics per task.
OLDER_BUILDER_VALUES = {"normalize_obs": False, "obs_std_floor": 0.0, "normalize_obs_per_task": True}


def load_policy(path, device: str = "cpu", fill_missing_keys: bool = False) -> Policy:
    """The policy of a checkpoint file, or of the newest good checkpoint of a run directory.

    device: where the actor runs (cpu, cuda, cuda:N or auto). fill_missing_keys: config keys the checkpoint's
    run did not have (written by an older mtrl_hpc) take what that run did (OLDER_BUILDER_VALUES, uniform goal draws)
    or else today's defaults; the networks must still match.
    Raises CheckpointError for a missing, corrupt or incomplete checkpoint."""
    from mtrl_hpc.agents import make_agent
    from mtrl_hpc.config_checks import resolve_device
    from mtrl_hpc.envs.metaworld import MetaWorldMultiTaskEnv

    path = find_checkpoint(path)
    state, config_yaml = checkpoint.load(path)
    device = resolve_device(device)
    try:
        cfg = OmegaConf.create(config_yaml)
        if fill_missing_keys:
            from mtrl_hpc.config_schema import reference_config

            if "builder" in cfg.agent:
                for key, value in OLDER_BUILDER_VALUES.items():
                    cfg.agent.builder.setdefault(key, value)
            # A run from before goal selection existed drew every training goal uniformly.
            if "goal_select" not in cfg.env:
                cfg.env.goal_select = "random"

            reference = reference_config([f"env={cfg.env.name}"])
            OmegaConf.set_struct(reference, False)
            cfg = OmegaConf.merge(reference, cfg)
        task_names = str(state["env"]["task_names"]).split(",")
        step = int(state["counters"]["step"])
        modules = state["agent"]["modules"]
        # The policy runs eagerly: compiling costs far more time than a few evaluations take.
        cfg.agent.compile = False
        agent = make_agent(cfg.agent, MetaWorldMultiTaskEnv.obs_dim, MetaWorldMultiTaskEnv.action_dim,
                           len(task_names), device, task_names=task_names)
    except (KeyError, TypeError, ValueError, OmegaConfBaseException) as e:
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and not fill_missing_keys:
            # A key this mtrl_hpc reads that the checkpoint's run did not write.
            raise CheckpointError(f"{path} was written by an older mtrl_hpc: its config has no "
                                  f"{e.full_key or short_error(e)}; load it with fill_missing_keys=True "
                                  f"(`python -m mtrl_hpc.evaluate ... fill_missing_keys=true`) to take today's "
                                  f"defaults for the keys it lacks") from None
        raise CheckpointError(f"{path} does not hold a policy this mtrl_hpc can build "
                              f"({type(e).__name__}: {short_error(e)})") from None
    try:
        agent.load_state_dict(modules)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the networks do not match the checkpoint's config "
                              f"({short_error(e)})") from None
    agent.eval()
    return Policy(agent, cfg, task_names, MetaWorldMultiTaskEnv.obs_dim, MetaWorldMultiTaskEnv.action_dim, path,
                  step, device)
