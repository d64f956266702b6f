"""FiLM encoder (agent.encoder.type_to_select=film): values and gradients against a plain per-row reference, which
losses train it, per-task modulation, save/resume, config checks and mtrl's documented command."""

import pytest
import torch

from agent_harness import (T, OBS, assert_resume_exact, grads_by_loss, make_agent, make_batch, optimizer_of, reached,
                           run_doc_command)
from mtrl_hpc.config_checks import check_config
from mtrl_hpc.nets.encoder import FiLMEncoder
from mtrl_hpc.nets.task_info import TaskInfo
from test_config import make_cfg

FILM = ["agent.encoder.type_to_select=film", "agent.multitask.should_use_task_encoder=True",
        "agent.multitask.task_encoder_cfg.model_cfg.output_dim=6", "agent.encoder.film.hidden_dim=8"]


def film_reference(layers, obs, encoding):
    """Row by row: h = act(h @ W + b) * gamma_l + beta_l with (gamma_l, beta_l) = encoding[2l], encoding[2l + 1]."""
    rows = []
    for r in range(obs.shape[0]):
        h = obs[r]
        for l, (w, b) in enumerate(layers):
            h = h @ w + b
            if l < len(layers) - 1:
                h = torch.relu(h)
            h = h * encoding[r, 2 * l] + encoding[r, 2 * l + 1]
        rows.append(h)
    return torch.stack(rows)


def test_film_equals_a_per_row_reference_values_and_gradients():
    torch.manual_seed(0)
    enc = FiLMEncoder(OBS, 8, 2, 4).double()
    obs = torch.randn(7, OBS, dtype=torch.float64, requires_grad=True)
    encoding = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    task = TaskInfo(torch.zeros(7, dtype=torch.int64), encoding, None)
    out = enc(obs, task)
    layers = [(l.weight[0], l.bias[0, 0]) for l in enc.layers]
    ref = film_reference(layers, obs, encoding)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    inputs = [obs, encoding, *enc.parameters()]
    for a, b in zip(torch.autograd.grad((out * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_film_refuses_a_task_encoding_of_the_wrong_size():
    enc = FiLMEncoder(OBS, 8, 2, 4)
    with pytest.raises(ValueError, match="needs a task encoding of 6 features"):
        enc(torch.zeros(2, OBS), TaskInfo(torch.zeros(2, dtype=torch.int64), torch.zeros(2, 50), None))


def test_film_is_trained_by_the_critic_loss_only_and_modulates_per_task():
    agent = make_agent(*FILM)
    film = list(agent.encoder.parameters())
    assert all(optimizer_of(agent, p) == "critic" for p in film)
    ids = torch.arange(T).repeat_interleave(4)
    grads = grads_by_loss(agent, film, make_batch(torch.Generator().manual_seed(1), ids))
    assert reached(grads["critic"])
    assert not reached(grads["actor"]) and not reached(grads["alpha"])
    # The same observation encoded for each task differs: the modulation is per task.
    obs = torch.randn(1, OBS).expand(T, OBS)
    with torch.no_grad():
        features = agent.encoder(obs, agent._task_info(torch.arange(T), None, None))
    assert all(not torch.allclose(features[i], features[j]) for i in range(T) for j in range(i))
    # The task encoder learns through FiLM's gains and shifts (losses_to_train [critic]).
    te = list(agent.task_encoder.parameters())
    te_grads = grads_by_loss(agent, te, make_batch(torch.Generator().manual_seed(2), ids), step=1)
    assert reached(te_grads["critic"]) and not reached(te_grads["actor"])


def test_film_save_resume_is_exact():
    assert_resume_exact(lambda seed: make_agent(*FILM, seed=seed), torch.tensor([0, 0, 0, 1, 2, 2]))


@pytest.mark.parametrize("overrides, needle", [
    (["agent.encoder.type_to_select=film"], "agent.encoder.type_to_select=film needs agent.multitask.should_use_task_encoder=True"),
    (["agent.encoder.type_to_select=film", "agent.multitask.should_use_task_encoder=True"],
     "output_dim=50: the FiLM encoder needs 2 * (agent.encoder.film.num_layers + 1) = 6"),
    (["agent.encoder.type_to_select=film", "agent.multitask.should_use_task_encoder=True", "agent.encoder.film.num_layers=3",
      "agent.multitask.task_encoder_cfg.model_cfg.output_dim=6"], "= 8 (a gain and a shift per layer)"),
    ([*FILM, "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False"],
     "set agent.multitask.actor_cfg.should_condition_encoder_on_task_info=True"),
])
def test_film_config_checks_name_the_key(overrides, needle):
    problems = check_config(make_cfg(*overrides))
    assert any(needle in p for p in problems), problems


MTRL_FILM = ("setup=metaworld env=metaworld-mt10 agent=state_sac experiment.num_eval_episodes=1 experiment.num_train_steps=2000000 "
             "setup.seed=1 replay_buffer.batch_size=1280 agent.multitask.num_envs=10 agent.multitask.should_use_disentangled_alpha=True "
             "agent.multitask.should_use_task_encoder=True agent.encoder.type_to_select=film agent.multitask.should_use_multi_head_policy=False "
             "agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg.should_use=True "
             "agent.multitask.task_encoder_cfg.model_cfg.output_dim=6")


def test_mtrl_film_command_trains(tmp_path, monkeypatch):
    m = run_doc_command(tmp_path, monkeypatch, MTRL_FILM)
    losses = m["train/critic_loss_env_index_"]
    assert losses.shape == (20, 10) and torch.isfinite(torch.as_tensor(losses[2:])).all()
    assert list(m["eval/step"]) == [0, 100, 200]
