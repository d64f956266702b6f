"""The training loop of one run: observe -> act -> step envs -> replay.add -> agent.update -> eval -> checkpoint.

`agent.observe` adds each step's observations to the agent's observation statistics (agent.builder.normalize_obs);
with agent.builder.n_step > 1 the steps pass through an n-step window (mtrl_hpc/n_step.py) on their way to replay.

Steps count steps of the batched env: one step moves every task once (mtrl's convention), so a run of
`num_train_steps` collects num_train_steps * num_tasks transitions. Episodes of all tasks share one clock
and end together (truncation at env.max_episode_steps; truncation is never treated as termination).

Order at an episode boundary (step % max_episode_steps == 0): log the finished episode, evaluate if
step % eval_freq == 0, checkpoint if a multiple of save.freq was reached during the episode that just ended
(or a stop was requested), then reset the envs.
Evaluations at steps inside an episode run in place on a separate eval env. Checkpoints fall on episode
boundaries (the first one at or after each multiple of save.freq), which is what makes resuming exact.
"""

import logging
import random
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from mtrl_hpc import checkpoint
from mtrl_hpc.agents import make_agent
from mtrl_hpc.divergence import DivergenceGuard
from mtrl_hpc.config_checks import OBS_DTYPES, resolve_device
from mtrl_hpc.envs import make_env
from mtrl_hpc.console import Console, ProgressLine, banner, clock, task_lines
from mtrl_hpc.metrics import MetricsLog, ProgressBar
from mtrl_hpc.n_step import NStepWindow
from mtrl_hpc.preemption import StopRequest
from mtrl_hpc.replay import ReplayBuffer
from mtrl_hpc.reward_normalization import RewardNormalizer

log = logging.getLogger(__name__)

# Keys a checkpoint must share with the run that resumes it.
RESUME_KEYS = (
    "env.name", "env.task_name", "env.max_episode_steps", "env.reward_function_version", "env.goal_select",
    "env.builder.make_kwargs.should_perform_reward_normalization", "agent.name",
    "agent.actor", "agent.critic", "agent.encoder", "agent.encoder_feature_dim", "agent.multitask", "replay_buffer.capacity",
    "replay_buffer.obs_dtype", "setup.seed", "agent.builder.n_step", "agent.builder.normalize_obs",
    "agent.builder.obs_std_floor", "agent.builder.normalize_obs_per_task",
)


class Experiment:
    def __init__(self, cfg, run_dir, stop: StopRequest | None = None, resume_command: str | None = None):
        """resume_command: the command line that continues this run, shown in the start-up banner."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.stop = stop or StopRequest()
        self.device = resolve_device(cfg.setup.device)
        self.console = Console(run_dir / "main.log")
        # Building MetaWorld's envs takes seconds per task: say so before it starts.
        self.console.echo(f"mtrl_hpc: building {cfg.env.name} ({cfg.env.num_envs} task{'s' if cfg.env.num_envs != 1 else ''}) "
                          f"and {cfg.agent.name} on {self.device} ...")
        seed = int(cfg.setup.seed)
        if cfg.setup.num_threads:
            torch.set_num_threads(int(cfg.setup.num_threads))
        random.seed(seed)
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)  # random actions before init_steps

        env_kwargs = dict(task_name=cfg.env.task_name, max_episode_steps=cfg.env.max_episode_steps,
                          reward_function_version=cfg.env.reward_function_version, num_envs=cfg.env.num_envs,
                          goal_select=cfg.env.goal_select)
        self.env = make_env(cfg.env.name, seed=seed, mode="train", **env_kwargs)
        self.eval_env = make_env(cfg.env.name, seed=seed, mode="eval", **env_kwargs)
        self.num_tasks = self.env.num_tasks
        self.task_names = list(self.env.task_names)
        self.task_ids = torch.arange(self.num_tasks, device=self.device)
        self.task_ids_host = np.arange(self.num_tasks)  # replay.add plans on the host: no device read

        self.agent = make_agent(cfg.agent, self.env.obs_dim, self.env.action_dim, self.num_tasks, self.device,
                                task_names=self.task_names)
        self.replay = ReplayBuffer(self.num_tasks, cfg.replay_buffer.capacity // self.num_tasks, (self.env.obs_dim,),
                                   (self.env.action_dim,), device=self.device, seed=seed,
                                   obs_dtype=OBS_DTYPES[cfg.replay_buffer.obs_dtype])
        normalize = cfg.env.builder.make_kwargs.should_perform_reward_normalization
        self.reward_normalizer = RewardNormalizer(self.num_tasks) if normalize else None
        n_step = int(cfg.agent.builder.n_step)
        self.n_step = NStepWindow(n_step, cfg.agent.builder.discount) if n_step > 1 else None
        self.guard = DivergenceGuard(self.agent, cfg.experiment.critic_loss_ceiling, run_dir)
        self.step = 0
        self.episode = 0
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self._resumed = self._maybe_resume()
        # metrics.* filter what is logged: the loop and the agent produce more, and only these are kept.
        train_keys, train_task_keys = _split_metric_names(cfg.metrics.train)
        eval_keys, eval_task_keys = _split_metric_names(cfg.metrics.eval)
        self._logged = {"train": (set(train_keys), set(train_task_keys)), "eval": (set(eval_keys), set(eval_task_keys))}
        keys = dict(train_keys=train_keys, eval_keys=eval_keys, train_task_keys=train_task_keys,
                    eval_task_keys=eval_task_keys, console=False, tensorboard=bool(cfg.logger.tensorboard))
        metrics_path = run_dir / "metrics.h5"
        if cfg.experiment.should_resume:
            # Rows after the checkpoint (or all rows, with no checkpoint) are dropped: they will be logged again.
            self.metrics = MetricsLog.resume(metrics_path, self.task_names, **keys, last_step=self.step if self._resumed else -1)
        else:
            self.metrics = MetricsLog(metrics_path, self.task_names, **keys)
        trainable = {id(p): p.numel() for opt in self.agent.optimizers().values()
                     for group in opt.param_groups for p in group["params"]}
        for line in banner(run_dir.resolve(), self.device, torch.get_num_threads(), seed, cfg.env.name, self.task_names,
                           cfg.agent.name, sum(trainable.values()), self.step if self._resumed else None, resume_command):
            self.console.echo(line)

    # ---- checkpoints ----
    def _state(self) -> dict:
        return {
            "agent": self.agent.training_state(),
            "counters": {"step": self.step, "episode": self.episode},
            "rng": {
                "torch": torch.get_rng_state(),
                # The training device's generator only: a requeued job may see other GPUs, or fewer.
                "torch_cuda": torch.cuda.get_rng_state(self.device) if self.device.startswith("cuda") else [],
                "numpy": _plain_bitgen_state(self.rng),
                "python": _python_rng_state(),
            },
            "env": self.env.get_state(),
            "reward_normalizer": self.reward_normalizer.state_dict() if self.reward_normalizer else {},
        }

    def save_checkpoint(self) -> None:
        save = self.cfg.experiment.save
        checkpoint.save(self.run_dir, self.step, self._state(), replay=self.replay if save.buffer.should_save else None,
                        config_yaml=self.config_yaml, retain_last_n=save.model.retain_last_n)

    def _maybe_resume(self) -> bool:
        if not self.cfg.experiment.should_resume:
            return False
        path = checkpoint.find_latest_good(self.run_dir)
        if path is None:
            return False
        state, saved_yaml = checkpoint.load(path)
        checkpoint.check_compatible(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True),
                                    OmegaConf.to_container(self.cfg, resolve=True), RESUME_KEYS)
        if self.cfg.experiment.save.buffer.should_save:
            checkpoint.load_replay(path, self.replay)
        self.agent.load_training_state(state["agent"])
        self.step = int(state["counters"]["step"])
        self.episode = int(state["counters"]["episode"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        _restore_cuda_rng(rng["torch_cuda"], self.device)
        self.rng.bit_generator.state = _bitgen_state_from_plain(rng["numpy"])
        random.setstate(_python_rng_from_plain(rng["python"]))
        self.env.set_state(state["env"])
        if self.reward_normalizer:
            self.reward_normalizer.load_state_dict(state["reward_normalizer"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ---- the loop ----
    def run(self) -> str:
        """Train until num_train_steps or a stop request. Returns "finished" or "stopped"."""
        cfg = self.cfg.experiment
        L = self.env.max_episode_steps
        batch_size = self.cfg.replay_buffer.batch_size
        bar = self.cfg.logger.progress_bar
        progress = ProgressBar(total=cfg.num_train_steps, initial=self.step, enabled=None if bar == "auto" else bool(bar))
        # Without a bar (SLURM logs), a plain line with the ETA every few episodes instead.
        progress_line = ProgressLine(cfg.num_train_steps, self.step, 0 if progress.enabled else self.cfg.logger.progress_every)
        self._run_start = time.monotonic()
        episode_updates = 0
        obs = None
        episode_reward = np.zeros(self.num_tasks)
        episode_success = np.zeros(self.num_tasks)
        # Per metric: its sum over this episode's updates and the number of updates that produced it (the actor
        # and temperature metrics come only from every actor_update_freq-th update).
        update_sums, update_counts = {}, {}
        episode_start = time.perf_counter()
        # A resumed run restarts right after the boundary work of its checkpoint's step.
        boundary_done = self._resumed
        if self.step >= cfg.num_train_steps and self._resumed:
            return "finished"
        try:
            while True:
                step = self.step
                if (step % L == 0 or step >= cfg.num_train_steps) and not boundary_done:
                    if obs is not None:
                        # The one read of the update metrics from the device in an episode.
                        means = {k: (v / update_counts[k]).cpu().numpy() for k, v in update_sums.items()}
                        self._log_train(step, episode_reward, episode_success, means, time.perf_counter() - episode_start,
                                        episode_updates)
                        if line := progress_line.line(step, self.episode):
                            self.console.echo(line)
                        # Before this boundary's evaluation and checkpoint: a diverged state is never saved.
                        if means:
                            self.guard.check(means, first_step=step - L, last_step=step)
                        update_sums, update_counts = {}, {}
                        episode_updates = 0
                    if step % cfg.eval_freq == 0:
                        self.evaluate()
                    if step >= cfg.num_train_steps:
                        self.save_checkpoint()
                        checkpoint.finish_run(self.run_dir, cfg.save.model.retain_last_n)
                        return "finished"
                    if _save_due(step, L, cfg.save.freq) or self.stop.requested:
                        self.save_checkpoint()
                    if self.stop.requested:
                        log.warning("stop requested (%s): checkpoint written at step %d", self.stop.reason, step)
                        return "stopped"
                boundary_done = False
                if step % L == 0:
                    obs = self.env.reset()
                    if self.n_step:
                        self.n_step.clear()
                    self.episode += 1
                    episode_reward[:] = 0
                    episode_success[:] = 0
                    episode_start = time.perf_counter()
                elif step % cfg.eval_freq == 0:
                    self.evaluate()

                obs_t = torch.as_tensor(obs, device=self.device)
                self.agent.observe(obs_t, self.task_ids)
                if step < cfg.init_steps:
                    action = self.rng.uniform(-1.0, 1.0, size=(self.num_tasks, self.env.action_dim)).astype(np.float32)
                else:
                    action = self.agent.act(obs_t, self.task_ids, sample=True).cpu().numpy()
                result = self.env.step(action)
                reward = self.reward_normalizer(result.reward) if self.reward_normalizer else result.reward
                if self.n_step is None:
                    self.replay.add(obs, action, reward, result.obs, result.terminated, self.task_ids_host)
                elif (row := self.n_step.push(obs, action, reward, result.obs, result.terminated)) is not None:
                    self.replay.add(*row, self.task_ids_host)
                episode_reward += result.reward
                np.maximum(episode_success, result.success, out=episode_success)
                obs = result.obs

                if step >= cfg.init_steps:
                    for i in range(cfg.num_updates_per_step):
                        # SAC's update frequencies count gradient updates, not env steps.
                        update_index = (step - cfg.init_steps) * cfg.num_updates_per_step + i
                        metrics = self.agent.update(self.replay.sample(batch_size), update_index)
                        episode_updates += 1
                        for k, v in metrics.items():
                            update_sums[k] = update_sums[k] + v if k in update_sums else v.clone()
                            update_counts[k] = update_counts.get(k, 0) + 1
                self.step = step + 1
                progress.update(1)
        finally:
            progress.close()

    def evaluate(self) -> None:
        def act(obs: np.ndarray) -> np.ndarray:
            return self.agent.act(torch.as_tensor(obs, device=self.device), self.task_ids, sample=False).cpu().numpy()

        if self.cfg.experiment.save_video:
            from mtrl_hpc import video  # renders with MuJoCo's GL libraries: only loaded when asked for

            # The first eval episode of each task, as <run_dir>/videos/step_<step>/<task>.mp4.
            result, _ = video.evaluate_and_record(self.eval_env, act, self.cfg.experiment.num_eval_episodes,
                                                  self.run_dir / "videos" / f"step_{self.step:012d}")
        else:
            result = self.eval_env.evaluate(act, self.cfg.experiment.num_eval_episodes)
        per_task = {"success": result.success_rate, "episode_reward": result.mean_episode_reward}
        scalars = {"episode": self.episode, "success": float(result.success_rate.mean()),
                   "episode_reward": float(result.mean_episode_reward.mean())}
        self.console.echo(self._log("eval", self.step, scalars, per_task))
        for line in task_lines("success per task", self.task_names, result.success_rate):
            self.console.echo(line)

    def _log_train(self, step, episode_reward, episode_success, means, duration, updates) -> None:
        scalars = {"episode": self.episode, "duration": duration,
                   "episode_reward": float(episode_reward.mean()), "success": float(episode_success.mean())}
        per_task = {"episode_reward": episode_reward.copy(), "success": episode_success.copy()}
        for k, mean in means.items():
            if k.endswith(TASK_SUFFIX):
                per_task[k[: -len(TASK_SUFFIX)]] = mean
            else:
                scalars[k] = float(mean)
        line = self._log("train", step, scalars, per_task)
        if self.cfg.logger.should_print_train:
            # Rates of this episode (env steps of the batched env, gradient updates) and the time this process ran.
            steps, duration = self.env.max_episode_steps, max(duration, 1e-9)
            self.console.echo(f"{line} SPS: {steps / duration:.0f} | UPS: {updates / duration:.0f} | "
                              f"T: {clock(time.monotonic() - self._run_start)} |")

    def _log(self, kind: str, step: int, scalars: dict, per_task: dict) -> str:
        keys, task_keys = self._logged[kind]
        return self.metrics.log(kind, step, {k: v for k, v in scalars.items() if k in keys},
                                {k: v for k, v in per_task.items() if k in task_keys})

    def close(self) -> None:
        self.metrics.close()
        self.env.close()
        self.eval_env.close()


TASK_SUFFIX = "_env_index_"


def _save_due(boundary: int, episode_steps: int, save_freq: int) -> bool:
    """Checkpoint at this episode boundary: a multiple of save_freq lies in (previous boundary, boundary]."""
    if not save_freq or boundary <= 0:
        return False
    return boundary // save_freq > max(boundary - episode_steps, 0) // save_freq


def _split_metric_names(names) -> tuple[list[str], list[str]]:
    """mtrl's metric names: "<key>_env_index_" is per task, "step" is the row's step, the rest are scalars."""
    names = list(names)
    scalars = [n for n in names if not n.endswith(TASK_SUFFIX) and n != "step"]
    per_task = [n[: -len(TASK_SUFFIX)] for n in names if n.endswith(TASK_SUFFIX)]
    return scalars, per_task


def _restore_cuda_rng(state, device: str) -> None:
    """Restores the training device's CUDA generator from a checkpoint's `rng/torch_cuda`."""
    state = torch.as_tensor(state)
    if not device.startswith("cuda") or state.numel() == 0:
        return
    if state.dim() == 2:
        # Written by a version that kept every visible device's state: take the training device's row.
        index = torch.device(device).index or 0
        if index >= state.shape[0]:
            log.warning("the checkpoint has no CUDA generator state for %s: it is seeded afresh", device)
            return
        state = state[index]
    torch.cuda.set_rng_state(state.to(torch.uint8), device)


def _plain_bitgen_state(rng: np.random.Generator) -> dict:
    s = rng.bit_generator.state
    return {"bit_generator": s["bit_generator"], "state": str(s["state"]["state"]), "inc": str(s["state"]["inc"]),
            "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}


def _bitgen_state_from_plain(p: dict) -> dict:
    return {"bit_generator": str(p["bit_generator"]), "state": {"state": int(p["state"]), "inc": int(p["inc"])},
            "has_uint32": int(p["has_uint32"]), "uinteger": int(p["uinteger"])}


def _python_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": np.asarray(internal, dtype=np.int64), "gauss": "" if gauss is None else repr(gauss)}


def _python_rng_from_plain(p: dict):
    gauss = None if p["gauss"] == "" else float(p["gauss"])
    return (int(p["version"]), tuple(int(x) for x in np.asarray(p["internal"])), gauss)
