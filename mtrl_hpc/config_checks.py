"""Checks of a composed config, run before anything is built: one clear line per problem."""

import difflib
import math
import os

import torch

from mtrl_hpc.agents import AGENTS
from mtrl_hpc.agents.gradient_methods import AGENT_METHODS, GRADIENT_ENGINES, PCGRAD_REDUCTIONS
from mtrl_hpc.agents.sac import OPTIMIZERS
from mtrl_hpc.envs import GOAL_SELECTS
from mtrl_hpc.nets.encoder import ENCODER_TYPES
from mtrl_hpc.nets.mlp import WEIGHT_INITS
from mtrl_hpc.nets.mixture import ROUTING_MODES
from mtrl_hpc.nets.trunk import TRUNK_MODES
from mtrl_hpc.task_embeddings import DESCRIPTIONS, MT10, cluster_mask, how_to_make

OBS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TASK_ENCODER_LOSSES = ("critic", "actor")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and how to fix it."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"setup.device={device} but torch sees no CUDA device; use setup.device=cpu or auto")
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"setup.device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    return device


def check_config(cfg) -> list[str]:
    """Every problem found in cfg, as messages naming the key (empty when the config can run)."""
    problems = []
    exp, env, agent, rb = cfg.experiment, cfg.env, cfg.agent, cfg.replay_buffer
    mt = agent.multitask

    def need(ok, message):
        if not ok:
            problems.append(message)

    for key in ("num_train_steps", "init_steps", "num_updates_per_step"):
        need(isinstance(exp[key], int) and exp[key] >= 0, f"experiment.{key}={exp[key]} must be an integer >= 0")
    need(isinstance(exp.eval_freq, int) and exp.eval_freq > 0, f"experiment.eval_freq={exp.eval_freq} must be an integer > 0")
    need(isinstance(exp.num_eval_episodes, int) and exp.num_eval_episodes >= 1,
         f"experiment.num_eval_episodes={exp.num_eval_episodes} must be an integer >= 1")
    need(isinstance(exp.save.model.retain_last_n, int) and exp.save.model.retain_last_n >= -1,
         f"experiment.save.model.retain_last_n={exp.save.model.retain_last_n} must be -1 (all), 0 (none) or a positive count")
    need(isinstance(env.max_episode_steps, int) and env.max_episode_steps >= 1,
         f"env.max_episode_steps={env.max_episode_steps} must be an integer >= 1")
    need(env.goal_select in GOAL_SELECTS,
         f"env.goal_select={env.goal_select!r} is not available; choose one of {', '.join(GOAL_SELECTS)}")
    ceiling = exp.critic_loss_ceiling
    need(ceiling is None or (_is_number(ceiling) and ceiling > 0),
         f"experiment.critic_loss_ceiling={ceiling} must be a number > 0, or null for no ceiling")
    need(isinstance(exp.save.freq, int) and exp.save.freq >= 0,
         f"experiment.save.freq={exp.save.freq} must be an integer >= 0 (0: no periodic checkpoints)")

    if env.name == "metaworld-mt1":
        problems.extend(_check_mt1_task(env.task_name))
    need(mt.num_envs == env.num_envs,
         f"agent.multitask.num_envs={mt.num_envs} but env={env.name} has {env.num_envs} tasks; set agent.multitask.num_envs={env.num_envs}")
    need(agent.name in AGENTS, f"agent.name={agent.name!r} is not available; choose one of {', '.join(AGENTS)}")
    if agent.encoder.type_to_select == "fmoe":
        problems.append("agent.encoder.type_to_select=fmoe: mtrl lists a factorized mixture in its config but never "
                        "implemented it, and neither does mtrl_hpc; use agent.encoder.type_to_select=moe")
    else:
        need(agent.encoder.type_to_select in ENCODER_TYPES,
             f"agent.encoder.type_to_select={agent.encoder.type_to_select!r} is not available; choose one of {', '.join(ENCODER_TYPES)}")
    for name, opt in agent.optimizers.items():
        need(opt["_target_"] in OPTIMIZERS,
             f"agent.optimizers.{name}._target_={opt['_target_']!r} is not available; choose one of {', '.join(OPTIMIZERS)}")
        need(opt.lr > 0, f"agent.optimizers.{name}.lr={opt.lr} must be > 0")
        clip = opt.get("max_grad_norm")
        need(clip is None or (_is_number(clip) and clip > 0),
             f"agent.optimizers.{name}.max_grad_norm={clip} must be a number > 0, or null for no clipping")
        problems.extend(_check_lr_decay(name, opt.lr, opt.get("lr_decay")))
    need(agent.builder.weight_init in WEIGHT_INITS,
         f"agent.builder.weight_init={agent.builder.weight_init!r} is not available; choose one of {', '.join(WEIGHT_INITS)}")
    bounds = agent.actor.log_std_bounds
    need(len(bounds) == 2 and all(_is_number(b) for b in bounds)
         and bounds[0] < bounds[1],
         f"agent.actor.log_std_bounds={list(bounds)} must be [low, high] numbers with low < high, e.g. [-5, 2]")
    for part in ("actor", "critic"):
        need(agent[part].num_layers >= 0 and agent[part].hidden_dim >= 1,
             f"agent.{part}: num_layers must be >= 0 and hidden_dim >= 1 (got {agent[part].num_layers}, {agent[part].hidden_dim})")
    need(0 < agent.builder.critic_tau <= 1 and 0 < agent.builder.encoder_tau <= 1,
         "agent.builder.critic_tau and encoder_tau must be in (0, 1]")
    need(0 <= agent.builder.discount <= 1, f"agent.builder.discount={agent.builder.discount} must be in [0, 1]")
    need(agent.builder.init_temperature > 0, f"agent.builder.init_temperature={agent.builder.init_temperature} must be > 0")
    target_entropy = agent.builder.target_entropy
    need(target_entropy is None or (_is_number(target_entropy) and math.isfinite(target_entropy)),
         f"agent.builder.target_entropy={target_entropy!r} must be a number, or null for -(action dimension)")
    need(agent.builder.actor_update_freq >= 1 and agent.builder.critic_target_update_freq >= 1,
         "agent.builder.actor_update_freq and critic_target_update_freq must be >= 1")
    floor = agent.builder.obs_std_floor
    need(math.isfinite(floor) and floor >= 0,
         f"agent.builder.obs_std_floor={floor} must be a finite number >= 0 (0: no floor)")
    n_step = agent.builder.n_step
    need(1 <= n_step <= env.max_episode_steps,
         f"agent.builder.n_step={n_step} must be an integer in [1, env.max_episode_steps={env.max_episode_steps}] "
         "(1: one-step targets)")
    if n_step > 1:
        need(exp.init_steps >= n_step,
             f"experiment.init_steps={exp.init_steps} is below agent.builder.n_step={n_step}: the first update would find "
             f"no {n_step}-step row in replay; set experiment.init_steps >= {n_step}")
        need(agent.name != "distral", "agent=distral adds log pi0 to every step's reward, which n-step rows leave out "
             "after their first step; use agent.builder.n_step=1 with distral")
    if mt.should_use_task_encoder:
        bad = [l for l in mt.task_encoder_cfg.losses_to_train if l not in TASK_ENCODER_LOSSES]
        need(not bad, f"agent.multitask.task_encoder_cfg.losses_to_train has {bad}; choose from {', '.join(TASK_ENCODER_LOSSES)}")
        need(mt.task_encoder_cfg.model_cfg.num_embeddings >= env.num_envs,
             "agent.multitask.task_encoder_cfg.model_cfg.num_embeddings must be >= the number of tasks")
    problems.extend(_check_task_conditioned_encoder(agent, env))
    problems.extend(_check_routed_trunk(agent))
    need(not mt.should_use_soft_modules_task_weights or mt.should_use_disentangled_alpha,
         "agent.multitask.should_use_soft_modules_task_weights=True weights tasks by their own temperatures: "
         "set agent.multitask.should_use_disentangled_alpha=True")
    pretrained = mt.task_encoder_cfg.model_cfg.pretrained_embedding_cfg
    if pretrained.should_use:
        key = "agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg"
        need(mt.should_use_task_encoder, f"{key}.should_use=True needs agent.multitask.should_use_task_encoder=True")
        path = pretrained.path_to_load_from
        need(os.path.isfile(str(path)), f"{key}.path_to_load_from={path}: no such file; {how_to_make(path)}")
    if mt.should_use_multi_head_policy:
        need(mt.multi_head_policy_cfg.num_layers >= 0, "agent.multitask.multi_head_policy_cfg.num_layers must be >= 0")
        need(not mt.should_use_disjoint_policy, "agent.multitask.should_use_disjoint_policy=True and should_use_multi_head_policy=True: "
             "a disjoint policy has no shared trunk to put heads on; choose one")

    problems.extend(_check_gradient_method(agent))

    need(rb.obs_dtype in OBS_DTYPES, f"replay_buffer.obs_dtype={rb.obs_dtype!r}; choose one of {', '.join(OBS_DTYPES)}")
    need(rb.batch_size >= env.num_envs,
         f"replay_buffer.batch_size={rb.batch_size} is smaller than the {env.num_envs} tasks: every task needs a share of each batch")
    need(rb.capacity >= env.num_envs, f"replay_buffer.capacity={rb.capacity} must hold at least one transition per task")
    return problems


def _is_number(value) -> bool:
    """An int or float from the config (YAML's true/false are bools, which Python counts as ints)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_lr_decay(name: str, lr, decay) -> list[str]:
    key = f"agent.optimizers.{name}.lr_decay"
    if decay is None or decay.get("final_lr") is None:
        return []
    final_lr, start, end = decay.get("final_lr"), decay.get("start"), decay.get("end")
    if not (_is_number(final_lr) and final_lr > 0):
        return [f"{key}.final_lr={final_lr} must be a number > 0, or null for a constant lr"]
    if _is_number(lr) and final_lr > lr:
        # A decay never raises the rate (a smaller lr given alone would otherwise climb to final_lr).
        return [f"{key}.final_lr={final_lr} is above agent.optimizers.{name}.lr={lr}; set {key}.final_lr to at most "
                f"{lr}, or to null for a constant lr"]
    if not (_is_integer(start) and _is_integer(end) and 0 <= start < end):
        return [f"{key}: start={start} and end={end} must be update counts with 0 <= start < end "
                f"(e.g. {key}.start=25000 {key}.end=35000)"]
    return []


def _check_task_conditioned_encoder(agent, env) -> list[str]:
    """FiLM and the attention/gate mixtures read the task encoding: it must exist, reach the encoder and have the
    size they need; the mixtures' routing must fit the tasks."""
    kind, mt, problems = agent.encoder.type_to_select, agent.multitask, []
    reads_encoding = kind == "film"
    if kind == "moe":
        problems.extend(_check_mixture(agent.encoder.moe, env))
        mode = agent.encoder.moe.task_id_to_encoder_id_cfg.mode
        reads_encoding = mode in ("gate", "attention") and \
            agent.encoder.moe.task_id_to_encoder_id_cfg[mode].task_encoder_cfg.should_use_task_encoding
    if not reads_encoding:
        return problems
    what = "agent.encoder.type_to_select=film" if kind == "film" else \
        f"agent.encoder.moe.task_id_to_encoder_id_cfg.mode={mode} with should_use_task_encoding"
    if not mt.should_use_task_encoder:
        problems.append(f"{what} needs agent.multitask.should_use_task_encoder=True (it reads the task encoding)")
    for part in ("actor_cfg", "critic_cfg"):
        if not mt[part].should_condition_encoder_on_task_info:
            problems.append(f"{what} reads the task encoding: set agent.multitask.{part}.should_condition_encoder_on_task_info=True")
    if kind == "film":
        want = 2 * (agent.encoder.film.num_layers + 1)
        got = mt.task_encoder_cfg.model_cfg.output_dim
        if mt.should_use_task_encoder and got != want:
            problems.append(f"agent.multitask.task_encoder_cfg.model_cfg.output_dim={got}: the FiLM encoder needs "
                            f"2 * (agent.encoder.film.num_layers + 1) = {want} (a gain and a shift per layer)")
    return problems


def _encoder_feature_dim(encoder) -> int | None:
    """The encoder's output size where the config fixes it (identity: the observation's, known only to the env)."""
    kind = encoder.type_to_select
    if kind in ("feedforward", "film"):
        return encoder[kind].feature_dim
    if kind == "moe":
        return encoder.moe.encoder_cfg.feature_dim
    return None


def _check_routed_trunk(agent) -> list[str]:
    mt, problems = agent.multitask, []
    for part, net in (("actor_cfg", "actor"), ("critic_cfg", "critic")):
        moe = mt[part].moe_cfg
        if not moe.should_use:
            continue
        key = f"agent.multitask.{part}.moe_cfg"
        if moe.mode not in TRUNK_MODES:
            problems.append(f"{key}.mode={moe.mode!r} is not available; choose one of {', '.join(TRUNK_MODES)}")
            continue
        if not (isinstance(moe.num_experts, int) and moe.num_experts >= 1):
            problems.append(f"{key}.num_experts={moe.num_experts} must be an integer >= 1")
        soft = moe.mode == "soft_modularization"  # PaCo and MOORE learn their own per-task weights from the task id
        if soft and not mt.should_use_task_encoder:
            problems.append(f"{key}.mode={moe.mode} routes by the task encoding: set agent.multitask.should_use_task_encoder=True")
        if soft and not mt[part].should_condition_model_on_task_info:
            problems.append(f"{key}.mode={moe.mode} reads the task information in the trunk: "
                            f"set agent.multitask.{part}.should_condition_model_on_task_info=True")
        if mt.should_use_multi_head_policy or mt.should_use_disjoint_policy:
            problems.append(f"{key}.should_use=True replaces the trunk: it cannot be combined with "
                            "agent.multitask.should_use_multi_head_policy or should_use_disjoint_policy")
        if agent[net].num_layers < 1:
            problems.append(f"agent.{net}.num_layers={agent[net].num_layers}: {moe.mode} needs at least one layer of modules")
        if agent[net].layer_norm:
            problems.append(f"agent.{net}.layer_norm=true: the {moe.mode} trunk ({key}) has no layer norm; "
                            f"set agent.{net}.layer_norm=false with it")
        features, task_dim = _encoder_feature_dim(agent.encoder), mt.task_encoder_cfg.model_cfg.output_dim
        if moe.mode == "soft_modularization" and mt.should_use_task_encoder and features is not None and features != task_dim:
            problems.append(f"{key}.mode=soft_modularization multiplies the encoder's features by the task encoding: "
                            f"agent.encoder.{agent.encoder.type_to_select} feature_dim={features} must equal "
                            f"agent.multitask.task_encoder_cfg.model_cfg.output_dim={task_dim}")
    return problems


def _check_gradient_method(agent) -> list[str]:
    """The keys of agent=pcgrad_state_sac / cagrad_state_sac / gradnorm_state_sac (agents/gradient_methods.py)."""
    method, mt, problems = AGENT_METHODS.get(agent.name), agent.multitask, []
    if method is not None and agent.gradient_engine not in GRADIENT_ENGINES:
        problems.append(f"agent.gradient_engine={agent.gradient_engine!r} is not available; choose one of {', '.join(GRADIENT_ENGINES)}")
    if method is not None and agent.compile:
        problems.append(f"agent.compile=true with agent={agent.name}: per-task gradients need the eager networks "
                        "(torch.compile's backward can be neither batched over tasks nor hooked per layer); set agent.compile=false")
    if method == "pcgrad" and agent.pcgrad.reduction not in PCGRAD_REDUCTIONS:
        problems.append(f"agent.pcgrad.reduction={agent.pcgrad.reduction!r} is not available; choose one of {', '.join(PCGRAD_REDUCTIONS)}")
    if method == "cagrad":
        c = agent.cagrad
        if not 0 <= c.c < 1:
            problems.append(f"agent.cagrad.c={c.c} must be in [0, 1) (0: the mean gradient)")
        if not c.num_iterations >= 1:
            problems.append(f"agent.cagrad.num_iterations={c.num_iterations} must be >= 1")
        if not c.lr > 0:
            problems.append(f"agent.cagrad.lr={c.lr} must be > 0")
    if agent.name == "distral":
        if not 0 < agent.distral_alpha <= 1:
            problems.append(f"agent.distral_alpha={agent.distral_alpha} must be in (0, 1] (at 0 nothing trains the "
                            "distilled policy that evaluation runs)")
        if not agent.distral_beta > 0:
            problems.append(f"agent.distral_beta={agent.distral_beta} must be > 0")
        if not mt.should_use_disjoint_policy:
            problems.append("agent=distral trains one actor and critic per task: agent.multitask.should_use_disjoint_policy must be True")
    if method == "gradnorm":
        if not agent.gradnorm.alpha >= 0:
            problems.append(f"agent.gradnorm.alpha={agent.gradnorm.alpha} must be >= 0")
        if not agent.gradnorm.lr > 0:
            problems.append(f"agent.gradnorm.lr={agent.gradnorm.lr} must be > 0")
        if mt.should_use_disjoint_policy:
            problems.append("agent=gradnorm_state_sac balances gradients on the last layer all tasks share, which "
                            "agent.multitask.should_use_disjoint_policy=True does not have")
    return problems


def _check_mixture(moe, env) -> list[str]:
    key = "agent.encoder.moe"
    route, experts, problems = moe.task_id_to_encoder_id_cfg, moe.num_experts, []
    if route.mode not in ROUTING_MODES:
        return [f"{key}.task_id_to_encoder_id_cfg.mode={route.mode!r} is not available; choose one of {', '.join(ROUTING_MODES)}"]
    if not (isinstance(experts, int) and experts >= 1):
        return [f"{key}.num_experts={experts} must be an integer >= 1"]
    if route.mode == "identity" and experts != env.num_envs:
        problems.append(f"{key}.num_experts={experts}: mode=identity gives each task its own expert; set {key}.num_experts={env.num_envs}")
    if route.mode == "cluster":
        clusters = route.cluster.clusters
        if experts != len(clusters):
            problems.append(f"{key}.num_experts={experts}: mode=cluster has one expert per cluster; set {key}.num_experts={len(clusters)}")
        names = [env.task_name] if env.name == "metaworld-mt1" else list(MT10) if env.num_envs == 10 else list(DESCRIPTIONS)
        names = [n for n in names if n in DESCRIPTIONS]  # an unknown MT1 name is reported by its own check
        if names:
            unmatched = [n for n, row in zip(names, cluster_mask(dict(clusters), names)) if not row.any()]
            if unmatched:
                problems.append(f"{key}.task_id_to_encoder_id_cfg.cluster.clusters match no word of the description of "
                                f"{', '.join(unmatched)}; add a keyword so every task has an expert")
    if route.mode in ("gate", "attention"):
        c = route[route.mode]
        if not c.temperature > 0:
            problems.append(f"{key}.task_id_to_encoder_id_cfg.{route.mode}.temperature={c.temperature} must be > 0")
        if route.mode == "gate" and not (isinstance(c.topk, int) and 1 <= c.topk <= experts):
            problems.append(f"{key}.task_id_to_encoder_id_cfg.gate.topk={c.topk} must be an integer in [1, {key}.num_experts={experts}]")
    return problems


def _check_mt1_task(task_name) -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # imports MuJoCo: only for MT1 configs

    if task_name in ALL_V3_ENVIRONMENTS:
        return []
    close = difflib.get_close_matches(str(task_name), list(ALL_V3_ENVIRONMENTS), n=1, cutoff=0.5)
    hint = f"did you mean env.task_name={close[0]}?" if close else f"choose one of {', '.join(sorted(ALL_V3_ENVIRONMENTS))}"
    return [f"env.task_name={task_name!r} is not a MetaWorld v3 task; {hint}"]


def validate(cfg) -> None:
    problems = check_config(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    resolve_device(cfg.setup.device)
