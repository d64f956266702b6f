"""Helpers the network tests share: compose an agent config, make batches, see which loss's backward reaches which
parameters, check save/resume, and run one of mtrl's documented commands for a few hundred steps."""

import json
import pathlib

import torch
from hydra import compose, initialize_config_dir

from mtrl_hpc.agents.sac import SACAgent
from mtrl_hpc.config_dir import config_dir
from mtrl_hpc.nets.routing import TaskRouting
from mtrl_hpc.replay import Batch
from mtrl_hpc.task_embeddings import MT10

T, OBS, ACT = 3, 5, 2
NAMES = ["reach-v3", "push-v3", "door-open-v3"]
PRETRAINED = "agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg"


def plain_mlp(layers, x):
    """A build_mlp-shaped MLP from (W [in, out], b [out]) pairs: ReLU between layers, linear output."""
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x


def agent_cfg(*overrides, num_tasks=T):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        # The references here see the batch as given and bootstrap one step: raw observations, one-step targets
        # (test_sac_update and test_obs_normalizer test normalize_obs and n_step against their own references).
        cfg = compose("config", overrides=["agent.actor.hidden_dim=16", "agent.actor.num_layers=2",
                                           f"agent.multitask.num_envs={num_tasks}", "agent.builder.normalize_obs=false",
                                           "agent.builder.n_step=1", *overrides])
    return cfg.agent


def make_agent(*overrides, seed=0, dtype=torch.float32, num_tasks=T, names=None):
    torch.manual_seed(seed)
    return SACAgent(agent_cfg(*overrides, num_tasks=num_tasks), OBS, ACT, num_tasks, "cpu",
                    task_names=names or NAMES[:num_tasks]).to(dtype)


def make_batch(gen, task_ids, dtype=torch.float32):
    n = task_ids.numel()
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return Batch(obs=r(n, OBS), action=torch.tanh(r(n, ACT)), reward=r(n, 1), next_obs=r(n, OBS),
                 not_done=torch.ones(n, 1, dtype=dtype), task_ids=task_ids, indices=torch.arange(n))


def task_counts(task_ids, num_tasks=T) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's rows per task and where each task's rows start, as the replay sampler plans a grouped batch."""
    counts = torch.bincount(task_ids, minlength=num_tasks)
    return counts, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def grouped_routing(task_ids, num_tasks=T) -> TaskRouting:
    """The routing of a batch grouped by task (the sampler's host counts and device offsets)."""
    counts, offsets = task_counts(task_ids, num_tasks)
    return TaskRouting(task_ids, num_tasks, counts.tolist(), offsets)


def optimizer_of(agent, param) -> str | None:
    names = [name for name, opt in agent.optimizers().items() for g in opt.param_groups for p in g["params"] if p is param]
    assert len(names) <= 1
    return names[0] if names else None


def grads_by_loss(agent, params, batch, step=0) -> dict[str, list[torch.Tensor | None]]:
    """What each loss's backward puts into `params` during one update: {"critic"|"actor"|"alpha": [grad or None]}."""
    original = agent.step_optimizer
    record = {}

    def spy(name, loss):
        for p in params:
            p.grad = None
        original(name, loss)
        record[name] = [None if p.grad is None else p.grad.clone() for p in params]

    agent.step_optimizer = spy
    try:
        agent.update(batch, step)
    finally:
        del agent.step_optimizer
    return record


def reached(grads) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def assert_resume_exact(make, task_ids, updates=3):
    """Train one agent, load its state into another built with another seed: the states and the next update agree."""
    a = make(seed=0)
    gen = torch.Generator().manual_seed(1)
    for step in range(updates):
        a.update(make_batch(gen, task_ids), step)
    b = make(seed=7)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    b.load_training_state(a.training_state())
    batch = make_batch(gen, task_ids)
    for agent in (a, b):
        torch.manual_seed(5)
        agent.update(batch, updates)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


def write_mtrl_table(path, dim=24, seed=0):
    """A table in mtrl's format (MetaWorld v1 names -> vectors) for the MT10 tasks."""
    g = torch.Generator().manual_seed(seed)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({f"{n[:-3]}-v1": torch.randn(dim, generator=g).tolist() for n in MT10}))
    return path


def run_doc_command(tmp_path, monkeypatch, command: str, steps=200):
    """One of mtrl's documented MetaWorld commands, as written, plus small sizes, trained for `steps` steps in
    tmp_path (where a pretrained embedding file is put at the configured relative path). Returns the metrics."""
    from test_train import TINY, read_metrics

    from mtrl_hpc.main import run

    monkeypatch.chdir(tmp_path)
    write_mtrl_table(tmp_path / "metadata/task_embedding/roberta_small/metaworld-mt10.json")
    keep = [o for o in command.split() if not o.startswith(("experiment.num_train_steps", "replay_buffer.batch_size",
                                                            "experiment.num_eval_episodes"))]
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *keep, f"experiment.num_train_steps={steps}", "experiment.eval_freq=100",
                                           "experiment.save.freq=100", f"setup.save_dir={run_dir}"])
    assert run(cfg, run_dir) == "finished"
    return read_metrics(run_dir)
