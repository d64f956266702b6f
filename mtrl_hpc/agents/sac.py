"""Multi-task SAC (mtrl's state_sac): twin critics with targets, a tanh-Gaussian actor, one temperature
shared or per task, optional per-task heads and task conditioning.

`update()` is the hot path. It makes no host syncs: the three losses are the compiled per-task ops of
mtrl_hpc.losses (each returns a loss per task), and the metrics it returns are device tensors that the
caller reads only when it logs.
"""

import copy
from typing import NamedTuple

import torch
from torch import nn

from mtrl_hpc import losses
from mtrl_hpc.agents.gradient_methods import make_gradient_method
from mtrl_hpc.agents.lr_schedule import LinearDecay, make_lr_schedule
from mtrl_hpc.nets.actor import Actor
from mtrl_hpc.nets.critic import TwinCritic
from mtrl_hpc.nets.encoder import make_encoder
from mtrl_hpc.nets.mlp import init_weights
from mtrl_hpc.nets.obs_normalizer import ObsNormalizer
from mtrl_hpc.nets.routing import TaskRouting
from mtrl_hpc.nets.task_info import OneHotTask, TaskEncoder, TaskInfo
from mtrl_hpc.nets.trunk import RoutedTrunk
from mtrl_hpc.task_embeddings import cluster_mask, load_table

OPTIMIZERS = {"torch.optim.Adam": torch.optim.Adam, "torch.optim.AdamW": torch.optim.AdamW}


# Keys of an optimizer's config node that are not arguments of the torch optimizer.
STEP_KEYS = ("_target_", "max_grad_norm", "lr_decay")


class OptimizerStep(NamedTuple):
    """One optimizer of the update and how it steps: its parameters, the gradient-norm clip before the step
    (None: off) and its learning-rate schedule (None: constant)."""
    optimizer: torch.optim.Optimizer
    params: list
    max_grad_norm: float | None
    lr_schedule: LinearDecay | None


def make_optimizer_step(params, optimizer_cfg) -> OptimizerStep:
    return OptimizerStep(make_optimizer(params, optimizer_cfg), params, _max_grad_norm(optimizer_cfg),
                         make_lr_schedule(optimizer_cfg))


def make_optimizer(params, optimizer_cfg) -> torch.optim.Optimizer:
    target = optimizer_cfg["_target_"]
    if target not in OPTIMIZERS:
        raise ValueError(f"optimizer _target_={target!r} is not available; choose one of {', '.join(OPTIMIZERS)}")
    kwargs = {k: v for k, v in optimizer_cfg.items() if k not in STEP_KEYS}
    kwargs["betas"] = tuple(kwargs.get("betas", (0.9, 0.999)))
    # One fused kernel for all parameters instead of a loop of small per-tensor updates.
    return OPTIMIZERS[target](params, fused=True, **kwargs)


def _uses_task_info(flags) -> bool:
    """Whether the trunk's input has the task encoding appended (a routed trunk reads the task itself)."""
    encoder_side = flags.should_condition_encoder_on_task_info and flags.should_concatenate_task_info_with_encoder
    model_side = flags.should_condition_model_on_task_info and not flags.moe_cfg.should_use
    return bool(encoder_side or model_side)


def _routed_trunk(flags, state_dim: int) -> RoutedTrunk | None:
    moe = flags.moe_cfg
    return RoutedTrunk(moe.mode, int(moe.num_experts), state_dim) if moe.should_use else None


class SACAgent(nn.Module):
    def __init__(self, cfg, obs_dim: int, action_dim: int, num_tasks: int, device: str, task_names: list[str] | None = None):
        super().__init__()
        mt = cfg.multitask
        b = cfg.builder
        self.num_tasks = num_tasks
        self.action_dim = action_dim
        # The critic's bootstrap discount: with n-step returns (mtrl_hpc/n_step.py) it bootstraps n steps ahead.
        self.discount = float(b.discount) ** int(b.n_step)
        self.critic_tau = float(b.critic_tau)
        self.encoder_tau = float(b.encoder_tau)
        self.actor_update_freq = int(b.actor_update_freq)
        self.critic_target_update_freq = int(b.critic_target_update_freq)
        self.target_entropy = -float(action_dim) if b.target_entropy is None else float(b.target_entropy)
        self.actor_uses_task = _uses_task_info(mt.actor_cfg)
        self.critic_uses_task = _uses_task_info(mt.critic_cfg)
        head_layers = int(mt.multi_head_policy_cfg.num_layers) if mt.should_use_multi_head_policy else None
        disjoint = bool(mt.should_use_disjoint_policy)
        self.multi_head = head_layers is not None or disjoint  # per-task layers in actor and critic

        if mt.should_use_task_encoder:
            m = mt.task_encoder_cfg.model_cfg
            self.task_encoder = TaskEncoder(m.num_embeddings, m.embedding_dim, m.hidden_dim, m.num_layers, m.output_dim,
                                            _pretrained_table(m.pretrained_embedding_cfg, num_tasks, task_names))
        else:
            self.task_encoder = OneHotTask(num_tasks)
        self.task_encoder_losses = set(mt.task_encoder_cfg.losses_to_train) if mt.should_use_task_encoder else set()
        task_dim = self.task_encoder.output_dim

        # The critic owns the encoder (trained by the critic loss); the actor reads its features detached.
        self.encoder = make_encoder(cfg.encoder, obs_dim, num_tasks, task_dim if mt.should_use_task_encoder else None,
                                    _cluster_mask(cfg.encoder, task_names))
        feature_dim = self.encoder.feature_dim
        self.actor = Actor(feature_dim + (task_dim if self.actor_uses_task else 0), action_dim, cfg.actor.hidden_dim,
                           cfg.actor.num_layers, tuple(cfg.actor.log_std_bounds), num_tasks, head_layers,
                           bool(cfg.actor.layer_norm), disjoint, _routed_trunk(mt.actor_cfg, feature_dim))
        self.critic = TwinCritic(feature_dim + (task_dim if self.critic_uses_task else 0), action_dim,
                                 cfg.critic.hidden_dim, cfg.critic.num_layers, num_tasks, head_layers,
                                 bool(cfg.critic.layer_norm), disjoint, _routed_trunk(mt.critic_cfg, feature_dim))
        # Rows reach per-task parameters (heads, experts, composed layers) through one TaskRouting per batch.
        self.needs_routing = self.multi_head or any(getattr(m, "needs_routing", False) for m in (
            self.encoder, self.actor.model, self.critic.model))
        if b.weight_init != "orthogonal":  # the layers start orthogonal
            for net in (self.task_encoder, self.encoder, self.actor, self.critic):
                init_weights(net, b.weight_init)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.encoder_target = copy.deepcopy(self.encoder).requires_grad_(False)
        self.obs_normalizer = (ObsNormalizer(num_tasks, obs_dim, b.obs_std_floor, b.normalize_obs_per_task)
                               if b.normalize_obs else None)
        self.register_buffer("_all_task_ids", torch.arange(num_tasks), persistent=False)
        self.use_task_weights = bool(mt.should_use_soft_modules_task_weights)
        num_alphas = num_tasks if mt.should_use_disentangled_alpha else 1
        self.log_alpha = nn.Parameter(torch.full((num_alphas,), float(b.init_temperature)).log())
        self.to(device)

        opt = cfg.optimizers
        critic_params = list(self.critic.parameters()) + list(self.encoder.parameters())
        if "critic" in self.task_encoder_losses:
            critic_params += list(self.task_encoder.parameters())
        actor_params = list(self.actor.parameters())
        if "actor" in self.task_encoder_losses:
            actor_params += list(self.task_encoder.parameters())
        # Per optimizer: how it steps (parameters, clip, learning-rate schedule); step_optimizer runs it.
        self._steps = {name: make_optimizer_step(params, opt[name]) for name, params in (
            ("actor", actor_params), ("critic", critic_params), ("alpha", [self.log_alpha]))}
        self._critic_params = list(self.critic.parameters())
        # (target, source) parameter lists for the soft target updates.
        self._critic_pairs = (list(self.critic_target.parameters()), self._critic_params)
        self._encoder_pairs = (list(self.encoder_target.parameters()), list(self.encoder.parameters()))
        # PCGrad / CAGrad / GradNorm (agents/gradient_methods.py): turns per-task losses into gradients; None: MT-SAC.
        self.gradient_method = make_gradient_method(cfg, self, device)

        if cfg.compile:
            self.actor.model = torch.compile(self.actor.model)
            self.critic.model = torch.compile(self.critic.model)
            self.critic_target.model = torch.compile(self.critic_target.model)

    # ---- inputs ----
    def _task_info(self, task_ids: torch.Tensor, routing: TaskRouting | None, loss: str | None) -> TaskInfo:
        """The one place task information is built for the encoders and trunks: the task encoding (one-hot,
        learned or pretrained) carries gradients only into the losses that train the task encoder."""
        # Encode each task once and gather its rows: the same values and gradients as encoding every row.
        encoding = self.task_encoder(self._all_task_ids)[task_ids]
        if loss not in self.task_encoder_losses:
            encoding = encoding.detach()
        return TaskInfo(task_ids, encoding, routing)

    def _inputs(self, features: torch.Tensor, task: TaskInfo, uses_task: bool) -> torch.Tensor:
        """A trunk's input: the encoder's features, with the task encoding appended where configured."""
        return torch.cat([features, task.encoding], dim=-1) if uses_task else features

    def observe(self, obs: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Adds one collected observation per task to the observation statistics (a no-op without them)."""
        if self.obs_normalizer is not None:
            self.obs_normalizer.update(obs, task_ids)

    def _normalized(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return obs if self.obs_normalizer is None else self.obs_normalizer(task_ids, obs)[0]

    def _normalized_batch(self, batch):
        if self.obs_normalizer is None:
            return batch
        obs, next_obs = self.obs_normalizer(batch.task_ids, batch.obs, batch.next_obs)
        return batch._replace(obs=obs, next_obs=next_obs)

    # ---- acting ----
    @torch.no_grad()
    def act(self, obs: torch.Tensor, task_ids: torch.Tensor, sample: bool) -> torch.Tensor:
        """Actions for one row per task ([tasks, obs_dim] -> [tasks, action_dim]), grouped by task."""
        obs = self._normalized(obs, task_ids)
        routing = TaskRouting.one_row_per_task(task_ids, self.num_tasks) if self.needs_routing else None
        task = self._task_info(task_ids, routing, None)
        return self.actor.act(self._inputs(self.encoder(obs, task), task, self.actor_uses_task), sample, task)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    # ---- learning ----
    def update(self, batch, step: int) -> dict[str, torch.Tensor]:
        """One SAC update; returns detached device tensors.

        step: the number of updates made before this one. The actor and temperature are updated when
        step % actor_update_freq == 0, the targets when step % critic_target_update_freq == 0 (SAC's
        frequencies count gradient updates, so they mean the same with several updates per env step)."""
        T = self.num_tasks
        batch = self._normalized_batch(batch)
        task_ids = batch.task_ids
        self.set_learning_rates(step)
        # Per-task heads find each row's task by id (any batch layout); one routing serves every network.
        routing = TaskRouting.from_batch(batch, T) if self.needs_routing else None
        if self.gradient_method is not None:
            self.gradient_method.begin(batch)
        metrics = {}

        # Critic: Bellman target with the per-task entropy bonus.
        with torch.no_grad():
            next_task = self._task_info(task_ids, routing, None)
            next_features = self.encoder(batch.next_obs, next_task)
            next_action, next_log_prob, _ = self.actor(self._inputs(next_features, next_task, self.actor_uses_task), next_task)
            target_features = self.encoder_target(batch.next_obs, next_task)
            tq1, tq2 = self.critic_target(self._inputs(target_features, next_task, self.critic_uses_task), next_action,
                                          next_task)
            target_q = torch.minimum(tq1, tq2)
        task = self._task_info(task_ids, routing, "critic")
        features = self.encoder(batch.obs, task)
        weights = self._task_weights()
        metrics.update(self._critic_step(batch, task, features, target_q, next_log_prob, weights))

        if step % self.actor_update_freq == 0:
            metrics.update(self._update_actor_and_alpha(features.detach(), task_ids, routing, weights))
        if step % self.critic_target_update_freq == 0:
            self._soft_update_targets()
        return metrics

    def _score_actions(self, features, task, action) -> tuple[torch.Tensor, torch.Tensor]:
        """Q1 and Q2 of the actor's actions, for the actor's loss: gradients reach the actions, not the critic."""
        for p in self._critic_params:
            p.requires_grad_(False)
        critic_task = task.detached()
        q1, q2 = self.critic(self._inputs(features, critic_task, self.critic_uses_task), action, critic_task)
        for p in self._critic_params:
            p.requires_grad_(True)
        return q1, q2

    def _critic_step(self, batch, task, features, target_q, next_log_prob, weights=None) -> dict[str, torch.Tensor]:
        """The critic's per-task losses against the target values `target_q`, and its optimizer step."""
        q1, q2 = self.critic(self._inputs(features, task, self.critic_uses_task), batch.action, task)
        critic_losses = losses.critic_loss(q1, q2, target_q, next_log_prob, batch.reward, batch.not_done,
                                           self.log_alpha, batch.task_ids, self.discount, self.num_tasks, weights)
        self.step_optimizer("critic", critic_losses)
        return {"critic_loss": critic_losses.mean().detach(), "critic_loss_env_index_": critic_losses.detach(),
                "batch_reward": batch.reward.mean()}

    def set_learning_rates(self, step: int) -> None:
        """Each decaying optimizer's rate for update `step` (a Python float: no device work)."""
        for optimizer, _, _, schedule in self._steps.values():
            if schedule is not None:
                lr = schedule(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr

    def step_optimizer(self, name: str, task_losses: torch.Tensor) -> None:
        """zero_grad -> backward -> clip -> step of one optimizer ("actor", "critic" or "alpha"): the one place
        where an update turns a loss into a parameter change. task_losses: the per-task losses [T]; MT-SAC
        descends their mean, a gradient method (PCGrad, CAGrad, GradNorm) makes the gradients from the vector."""
        optimizer, params, max_norm, _ = self._steps[name]
        optimizer.zero_grad(set_to_none=True)
        if self.gradient_method is None:
            task_losses.mean().backward()
        else:
            self.gradient_method.backward(name, task_losses, params)
        if max_norm is not None:
            # foreach: one fused norm over all gradients, no host sync.
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        optimizer.step()

    @torch.no_grad()
    def _soft_update_targets(self) -> None:
        # target <- target + tau * (source - target), one fused call per group of parameters.
        torch._foreach_lerp_(*self._critic_pairs, self.critic_tau)
        if self._encoder_pairs[0]:
            torch._foreach_lerp_(*self._encoder_pairs, self.encoder_tau)

    def _task_weights(self) -> torch.Tensor | None:
        """Soft Modularization's task loss weights, T * softmax(-log_alpha): tasks whose temperature is still high
        (little learned yet) count less; constants of the update."""
        if not self.use_task_weights:
            return None
        return self.num_tasks * torch.softmax(-self.log_alpha.detach(), dim=0)

    def _update_actor_and_alpha(self, features: torch.Tensor, task_ids: torch.Tensor, routing,
                                weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        T = self.num_tasks
        task = self._task_info(task_ids, routing, "actor")
        action, log_prob, _ = self.actor(self._inputs(features, task, self.actor_uses_task), task)
        q1, q2 = self._score_actions(features, task, action)
        actor_losses = losses.actor_loss(log_prob, q1, q2, self.log_alpha, task_ids, T, weights)
        actor_loss = actor_losses.mean()
        self.step_optimizer("actor", actor_losses)

        alpha_losses = losses.temperature_loss(log_prob.detach(), self.log_alpha, task_ids, self.target_entropy, T)
        alpha_loss = alpha_losses.mean()
        self.step_optimizer("alpha", alpha_losses)
        alpha = self.alpha
        return {
            "actor_loss": actor_loss.detach(),
            "actor_loss_env_index_": actor_losses.detach(),
            "actor_entropy": -log_prob.detach().mean(),
            "alpha_loss": alpha_loss.detach(),
            "alpha_value": alpha.mean(),
            "alpha_value_env_index_": alpha.expand(T),
        }

    # ---- state (checkpoints) ----
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: step.optimizer for name, step in self._steps.items()}

    def training_state(self) -> dict:
        """Networks, targets, log_alpha, task encoder and optimizer states, as a tree of tensors and plain data."""
        # Keys without torch.compile's "_orig_mod." wrapper: a checkpoint resumes with or without agent.compile.
        state = {
            "modules": {_plain_key(k): v.detach().clone() for k, v in self.state_dict().items()},
            "optimizers": {name: _optimizer_state(opt) for name, opt in self.optimizers().items()},
        }
        if self.gradient_method is not None:
            state["gradient_method"] = self.gradient_method.state_dict()
        return state

    def load_training_state(self, state: dict) -> None:
        own = {_plain_key(k): k for k in self.state_dict()}
        self.load_state_dict({own.get(k, k): v for k, v in state["modules"].items()})
        for name, opt in self.optimizers().items():
            opt.load_state_dict(_optimizer_state_from_tree(state["optimizers"][name]))
        if self.gradient_method is not None:
            self.gradient_method.load_state_dict(state.get("gradient_method", {}))


def _pretrained_table(pretrained_cfg, num_tasks: int, task_names: list[str] | None) -> torch.Tensor | None:
    if not pretrained_cfg.should_use:
        return None
    if task_names is None or len(task_names) != num_tasks:
        raise ValueError("pretrained task embeddings need the env's task names (make_agent(..., task_names=env.task_names))")
    return load_table(pretrained_cfg.path_to_load_from, task_names)


def _cluster_mask(encoder_cfg, task_names: list[str] | None) -> torch.Tensor | None:
    if encoder_cfg.type_to_select != "moe" or encoder_cfg.moe.task_id_to_encoder_id_cfg.mode != "cluster":
        return None
    if task_names is None:
        raise ValueError("agent.encoder.moe.task_id_to_encoder_id_cfg.mode=cluster needs the env's task names "
                         "(make_agent(..., task_names=env.task_names))")
    return cluster_mask(dict(encoder_cfg.moe.task_id_to_encoder_id_cfg.cluster.clusters), task_names)


def _plain_key(key: str) -> str:
    return key.replace("_orig_mod.", "")


def _max_grad_norm(optimizer_cfg) -> float | None:
    value = optimizer_cfg.get("max_grad_norm")
    return None if value is None else float(value)


def _optimizer_state(opt: torch.optim.Optimizer) -> dict:
    # Parameter ids become string keys, tuples become lists: a tree HDF5 can hold.
    sd = opt.state_dict()
    return {
        "state": {str(i): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()},
        "param_groups": {str(i): {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
                         for i, g in enumerate(sd["param_groups"])},
    }


def _optimizer_state_from_tree(tree: dict) -> dict:
    groups = [tree["param_groups"][k] for k in sorted(tree["param_groups"], key=int)]
    return {
        "state": {int(i): dict(s) for i, s in tree["state"].items()},
        "param_groups": [dict(g, params=[int(p) for p in g["params"]], betas=tuple(g["betas"])) for g in groups],
    }
