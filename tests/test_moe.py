"""Mixture of encoders (agent.encoder.type_to_select=moe, CARE with mode=attention): every routing mode against a
plain reference that runs each expert as its own MLP row by row, which losses train the experts, the routing and
the task encoder (CARE's detach), per-task routing, save/resume, config checks and mtrl's CARE command."""

import pytest
import torch

from agent_harness import (NAMES, OBS, T, assert_resume_exact, grads_by_loss, make_agent, make_batch, optimizer_of,
                           plain_mlp, reached, run_doc_command)
from mtrl_hpc.config_checks import check_config
from mtrl_hpc.nets.mixture import AttentionExpertWeights, FixedExpertWeights, MixtureEncoder
from mtrl_hpc.nets.routing import TaskRouting
from mtrl_hpc.nets.task_info import TaskInfo
from mtrl_hpc.task_embeddings import MT10, cluster_mask
from test_config import make_cfg

E, F, H = 4, 6, 8
MOE = "agent.encoder.type_to_select=moe"
MODE = "agent.encoder.moe.task_id_to_encoder_id_cfg.mode"
CARE = [MOE, f"{MODE}=attention", "agent.encoder.moe.num_experts=4", "agent.multitask.should_use_task_encoder=True",
        "agent.encoder.moe.encoder_cfg.hidden_dim=8"]




def expert_layers(enc, e):
    return [(l.weight[e], l.bias[e, 0]) for l in enc.experts.trunk]


def reference_weights(selection, task, mode):
    """Each row's expert weights, written out: mask rows / their sum, or softmax(MLP(z) / temperature) with top-k."""
    if mode == "fixed":
        return torch.stack([selection.weights[t] for t in task.ids])  # the module's table is checked separately
    z = task.encoding
    layers = [(l.weight[0], l.bias[0, 0]) for l in selection.mlp.trunk]
    rows = []
    for r in range(z.shape[0]):
        p = torch.softmax(plain_mlp(layers, z[r]) / selection.temperature, dim=0)
        if mode == "gate":
            order = sorted(range(E), key=lambda e: -float(p[e].detach()))[: selection.topk]
            keep = torch.zeros(E, dtype=p.dtype)
            keep[order] = 1.0
            p = p * keep / (p * keep).sum()
        rows.append(p)
    return torch.stack(rows)


def check_against_reference(enc, obs, task, weights_ref_fn, params):
    out = enc(obs, task)
    w = weights_ref_fn()
    ref = torch.stack([sum(w[r, e] * plain_mlp(expert_layers(enc, e), obs[r]) for e in range(E)) for r in range(obs.shape[0])])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def inputs(rows=9, dim=5):
    torch.manual_seed(1)
    obs = torch.randn(rows, OBS, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1, 0])[:rows]
    encoding = torch.randn(rows, dim, dtype=torch.float64, requires_grad=True)
    return obs, TaskInfo(ids, encoding, None)


@pytest.mark.parametrize("mode", ["attention", "gate"])
def test_attention_and_gate_equal_a_plain_reference(mode):
    obs, task = inputs()
    torch.manual_seed(0)
    selection = AttentionExpertWeights(T, E, 5, 50, H, 2, temperature=0.7, detach=False, topk=2 if mode == "gate" else None)
    enc = MixtureEncoder(OBS, H, 2, F, E, selection).double()
    check_against_reference(enc, obs, task, lambda: reference_weights(selection, task, mode),
                            [obs, task.encoding, *enc.parameters()])
    w = enc.expert_weights(task)
    torch.testing.assert_close(w.sum(-1), torch.ones(9, dtype=torch.float64))
    if mode == "gate":
        assert ((w > 0).sum(-1) == 2).all()


@pytest.mark.parametrize("mode", ["ensemble", "cluster"])
def test_fixed_routings_equal_a_plain_reference(mode):
    obs, task = inputs()
    mask = torch.ones(T, E) if mode == "ensemble" else torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    selection = FixedExpertWeights(mask.double())
    torch.testing.assert_close(selection.weights, mask.double() / mask.double().sum(1, keepdim=True))
    torch.manual_seed(0)
    enc = MixtureEncoder(OBS, H, 2, F, E, selection).double()
    check_against_reference(enc, obs, task, lambda: reference_weights(selection, task, "fixed"), [obs, *enc.parameters()])


@pytest.mark.parametrize("ids", [[0, 2, 2, 1, 0, 2, 1, 1, 0], [2, 2, 0, 0, 0], [1, 1, 1, 1]], ids=["shuffled", "missing", "one"])
def test_identity_runs_each_row_through_its_own_tasks_expert(ids):
    ids = torch.tensor(ids)
    torch.manual_seed(0)
    enc = MixtureEncoder(OBS, H, 2, F, T, None).double()
    obs = torch.randn(len(ids), OBS, dtype=torch.float64, requires_grad=True)
    out = enc(obs, TaskInfo(ids, torch.zeros(len(ids), 1), TaskRouting(ids, T)))
    ref = torch.stack([plain_mlp(expert_layers(enc, int(t)), obs[r]) for r, t in enumerate(ids)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [obs, *enc.parameters()]
    grads = torch.autograd.grad((out * g).sum(), params)
    for a, b in zip(grads, torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    first_weight = grads[1]
    for t in set(range(T)) - set(ids.tolist()):
        assert not first_weight[t].any()  # a task without rows: its expert gets no gradient


def test_clusters_cover_every_metaworld_task():
    from metaworld.env_dict import MT50_V3

    clusters = dict(make_cfg().agent.encoder.moe.task_id_to_encoder_id_cfg.cluster.clusters)
    mask = cluster_mask(clusters, list(MT50_V3))
    assert (mask.sum(1) >= 1).all()
    # Tasks that share their clusters share their experts (mtrl's idea); opposite tasks do not.
    mt10 = dict(zip(MT10, cluster_mask(clusters, list(MT10))))
    assert len({tuple(r.tolist()) for r in mt10.values()}) > 5
    assert not torch.equal(mt10["window-open-v3"], mt10["window-close-v3"])
    assert not torch.equal(mt10["reach-v3"], mt10["push-v3"])
    # Whole words, any case: "lock" is not matched inside "clockwise", nor "unlock" in "Lock the door".
    words = cluster_mask({"lock": ["LOCK"], "unlock": ["unlock"]}, ["faucet-close-v3", "door-lock-v3"])
    assert words.tolist() == [[0.0, 0.0], [1.0, 0.0]]


# ---- in the agent ----

AGENT_MODES = {
    "identity": [MOE, f"{MODE}=identity", f"agent.encoder.moe.num_experts={T}"],
    "ensemble": [MOE, f"{MODE}=ensemble", "agent.encoder.moe.num_experts=4"],
    "cluster": [MOE, f"{MODE}=cluster"],
    "gate": [MOE, f"{MODE}=gate", "agent.encoder.moe.num_experts=4", "agent.multitask.should_use_task_encoder=True"],
    "attention": CARE,
    "attention_own_embedding": [MOE, f"{MODE}=attention", "agent.encoder.moe.num_experts=4",
                                "agent.encoder.moe.task_id_to_encoder_id_cfg.attention.task_encoder_cfg.should_use_task_encoding=False"],
}
IDS = torch.tensor([0, 0, 0, 0, 1, 2, 2])  # unequal shares


@pytest.mark.parametrize("mode", sorted(AGENT_MODES))
def test_experts_and_routing_are_trained_by_the_critic_loss_only(mode):
    agent = make_agent(*AGENT_MODES[mode])
    params = list(agent.encoder.parameters())
    assert params and all(optimizer_of(agent, p) == "critic" for p in params)
    grads = grads_by_loss(agent, params, make_batch(torch.Generator().manual_seed(1), IDS))
    experts = [g for p, g in zip(params, grads["critic"]) if any(p is q for q in agent.encoder.experts.parameters())]
    assert reached(experts)
    if agent.encoder.selection is not None and list(agent.encoder.selection.parameters()):
        routing = [g for p, g in zip(params, grads["critic"]) if any(p is q for q in agent.encoder.selection.parameters())]
        assert reached(routing)
    assert not reached(grads["actor"]) and not reached(grads["alpha"])


@pytest.mark.parametrize("mode", ["cluster", "gate", "attention", "attention_own_embedding"])
def test_routing_weights_differ_between_tasks(mode):
    agent = make_agent(*AGENT_MODES[mode])
    with torch.no_grad():
        w = agent.encoder.expert_weights(agent._task_info(torch.arange(T), None, None))
    assert all(not torch.allclose(w[i], w[j]) for i in range(T) for j in range(i))


@pytest.mark.parametrize("detach", [True, False])
def test_care_detaches_the_task_encoding_from_the_attention(detach):
    # The task encoder feeds only the attention here (not concatenated to the features): with the detach (the
    # CARE paper, the default) it gets no gradient; without it the critic loss trains it through the attention.
    agent = make_agent(*CARE, "agent.multitask.actor_cfg.should_concatenate_task_info_with_encoder=False",
                       f"agent.encoder.moe.task_id_to_encoder_id_cfg.attention.task_encoder_cfg.should_detach_task_encoding={detach}")
    grads = grads_by_loss(agent, list(agent.task_encoder.parameters()), make_batch(torch.Generator().manual_seed(1), IDS))
    assert reached(grads["critic"]) is not detach


@pytest.mark.parametrize("mode", ["identity", "attention"])
def test_moe_save_resume_is_exact(mode):
    assert_resume_exact(lambda seed: make_agent(*AGENT_MODES[mode], seed=seed), IDS)


@pytest.mark.parametrize("overrides, needle", [
    ([MOE, f"{MODE}=identity", "agent.encoder.moe.num_experts=4"], "mode=identity gives each task its own expert; set agent.encoder.moe.num_experts=10"),
    ([MOE, f"{MODE}=cluster", "agent.encoder.moe.num_experts=4"], "mode=cluster has one expert per cluster; set agent.encoder.moe.num_experts=9"),
    ([MOE, f"{MODE}=cluster", "agent.encoder.moe.num_experts=1", "~agent.encoder.moe.task_id_to_encoder_id_cfg.cluster.clusters",
      "+agent.encoder.moe.task_id_to_encoder_id_cfg.cluster.clusters={only: [door]}"], "match no word of the description of reach-v3"),
    ([MOE, f"{MODE}=soft"], "mode='soft' is not available; choose one of identity, ensemble, cluster, gate, attention"),
    ([MOE, f"{MODE}=gate", "agent.multitask.should_use_task_encoder=True", "agent.encoder.moe.task_id_to_encoder_id_cfg.gate.topk=12"],
     "gate.topk=12 must be an integer in [1, agent.encoder.moe.num_experts=9]"),
    ([MOE, f"{MODE}=attention", "agent.encoder.moe.num_experts=4"],
     "mode=attention with should_use_task_encoding needs agent.multitask.should_use_task_encoder=True"),
    ([*CARE, "agent.multitask.actor_cfg.should_condition_encoder_on_task_info=False"],
     "set agent.multitask.actor_cfg.should_condition_encoder_on_task_info=True"),
    ([*CARE, "agent.encoder.moe.task_id_to_encoder_id_cfg.attention.temperature=0"], "attention.temperature=0 must be > 0"),
    (["agent.encoder.type_to_select=fmoe"], "agent.encoder.type_to_select=fmoe: mtrl lists a factorized mixture in its config but never implemented it"),
])
def test_moe_config_checks_name_the_key(overrides, needle):
    problems = check_config(make_cfg(*overrides))
    assert any(needle in p for p in problems), problems


def test_every_mode_passes_the_checks_with_mt10():
    for mode, overrides in AGENT_MODES.items():
        extra = ["agent.encoder.moe.num_experts=10"] if mode == "identity" else []
        assert check_config(make_cfg(*overrides, *extra)) == [], mode


MTRL_CARE = ("setup=metaworld env=metaworld-mt10 agent=state_sac experiment.num_eval_episodes=1 experiment.num_train_steps=2000000 "
             "setup.seed=1 replay_buffer.batch_size=1280 agent.multitask.num_envs=10 agent.multitask.should_use_disentangled_alpha=True "
             "agent.multitask.should_use_task_encoder=True agent.encoder.type_to_select=moe agent.multitask.should_use_multi_head_policy=False "
             "agent.encoder.moe.task_id_to_encoder_id_cfg.mode=attention agent.encoder.moe.num_experts=4 "
             "agent.multitask.task_encoder_cfg.model_cfg.pretrained_embedding_cfg.should_use=True")


def test_mtrl_care_command_trains(tmp_path, monkeypatch):
    m = run_doc_command(tmp_path, monkeypatch, MTRL_CARE)
    losses = m["train/critic_loss_env_index_"]
    assert losses.shape == (20, 10) and torch.isfinite(torch.as_tensor(losses[2:])).all()
    assert list(m["eval/step"]) == [0, 100, 200]


def test_cluster_mode_trains_on_mt10(tmp_path, monkeypatch):
    m = run_doc_command(tmp_path, monkeypatch, f"env=metaworld-mt10 {MOE} {MODE}=cluster", steps=100)
    assert torch.isfinite(torch.as_tensor(m["train/critic_loss_env_index_"][2:])).all()


def test_agent_names_are_needed_for_clusters():
    from agent_harness import agent_cfg
    from mtrl_hpc.agents.sac import SACAgent

    with pytest.raises(ValueError, match="mode=cluster needs the env's task names"):
        SACAgent(agent_cfg(*AGENT_MODES["cluster"]), OBS, 2, T, "cpu")
    assert NAMES  # the harness's names are MetaWorld v3 tasks with descriptions
