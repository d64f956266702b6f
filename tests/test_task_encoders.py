"""Task encoders: learned and pretrained embeddings against plain-PyTorch references, the embedding files (mtrl's
v1-named JSON and the project's format), the command that computes a table with a local transformer model (a
tiny random one built here), and the agent's use of them: which losses train what, save/resume."""

import json

import pytest
import torch
from agent_harness import ACT, NAMES, OBS, PRETRAINED, T, agent_cfg, make_batch, plain_mlp

from mtrl_hpc.agents.sac import SACAgent
from mtrl_hpc.nets.task_info import TaskEncoder
from mtrl_hpc.task_embeddings import DESCRIPTIONS, FORMAT, MT10, load_table, main

BATCH_IDS = torch.arange(T).repeat_interleave(4)  # 12 rows, 4 per task





def layers_of(stacked):
    return [(l.weight[0], l.bias[0, 0]) for l in stacked.trunk]


def test_learned_encoder_is_embedding_relu_mlp():
    torch.manual_seed(0)
    enc = TaskEncoder(4, 6, 8, 2, 5).double()
    ids = torch.tensor([2, 0, 2, 3])
    out = enc(ids)
    ref = plain_mlp(layers_of(enc.mlp), torch.relu(enc.embedding.weight[ids]))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [enc.embedding.weight, *enc.mlp.parameters()]
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Task 1 has no rows: its embedding gets no gradient.
    assert not torch.autograd.grad((enc(ids) * g).sum(), enc.embedding.weight)[0][1].any()


def test_pretrained_encoder_is_frozen_table_relu_projection_mlp():
    torch.manual_seed(0)
    table = torch.randn(3, 12, dtype=torch.float64)
    enc = TaskEncoder(3, 4, 8, 2, 5, pretrained=table).double()
    assert enc.embedding is None and "pretrained" not in dict(enc.named_parameters())
    ids = torch.tensor([1, 1, 0, 2])
    out = enc(ids)
    # mtrl: Embedding.from_pretrained(freeze) -> ReLU -> Linear(12, 8) -> ReLU -> Linear(8, 4) -> ReLU -> trunk
    h = torch.relu(plain_mlp(layers_of(enc.projection), torch.relu(table[ids])))
    ref = plain_mlp(layers_of(enc.mlp), h)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert enc.projection.trunk[0].weight.shape == (1, 12, 8) and enc.projection.trunk[1].weight.shape == (1, 8, 4)
    g = torch.randn_like(out)
    params = list(enc.parameters())
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- files ----


def test_mtrl_json_with_v1_names_maps_to_v3_tasks_in_order(tmp_path):
    vectors = {f"{n[:-3]}-v1": [float(i), float(i) + 0.5] for i, n in enumerate(MT10)}
    path = tmp_path / "metaworld-mt10.json"
    path.write_text(json.dumps(vectors))
    table = load_table(path, ["door-open-v3", "reach-v3", "window-close-v3"])
    torch.testing.assert_close(table, torch.tensor([[3.0, 3.5], [0.0, 0.5], [9.0, 9.5]]))


def test_project_format_and_refusals(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": FORMAT, "embeddings": {"reach-v3": [1.0, 2.0], "push-v3": [3.0, 4.0]}}))
    torch.testing.assert_close(load_table(path, ["push-v3", "reach-v3"]), torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="no embedding for door-open-v3"):
        load_table(path, ["reach-v3", "door-open-v3"])
    path.write_text(json.dumps({"format": "other/9", "embeddings": {}}))
    with pytest.raises(ValueError, match="unknown task embedding format"):
        load_table(path, ["reach-v3"])
    with pytest.raises(FileNotFoundError, match="python -m mtrl_hpc.task_embeddings"):
        load_table(tmp_path / "missing.json", ["reach-v3"])


def test_every_metaworld_v3_task_has_a_description():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT50_V3

    assert set(MT50_V3) <= set(DESCRIPTIONS) <= set(ALL_V3_ENVIRONMENTS)
    assert len(set(DESCRIPTIONS.values())) == len(DESCRIPTIONS)  # no two tasks share a description


def tiny_model_dir(tmp_path):
    """A randomly initialised 2-layer BERT and a word-level tokenizer over the descriptions' words, saved locally."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for d in DESCRIPTIONS.values() for w in d.replace(".", " . ").replace(",", " , ").split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    model_dir = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return model_dir, fast


def test_command_computes_mean_pooled_table_from_a_local_model(tmp_path):
    model_dir, tokenizer = tiny_model_dir(tmp_path)
    out = tmp_path / "emb" / "mt10.json"
    main(["--model", str(model_dir), "--out", str(out), "--benchmark", "MT10"])
    doc = json.loads(out.read_text())
    assert doc["format"] == FORMAT and list(doc["embeddings"]) == list(MT10)
    assert doc["descriptions"]["reach-v3"] == DESCRIPTIONS["reach-v3"]
    # Reference: each description alone (no padding), mean of the last hidden layer over its tokens.
    import transformers

    model = transformers.BertModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for name in ("reach-v3", "peg-insert-side-v3"):  # the shortest and a longer one: padding must not count
            ids = tokenizer(DESCRIPTIONS[name], return_tensors="pt")
            ref = model(**ids).last_hidden_state[0].mean(0)
            torch.testing.assert_close(torch.tensor(doc["embeddings"][name]), ref, rtol=1e-5, atol=1e-6)
    table = load_table(out, NAMES)
    assert table.shape == (3, 16)
    assert not torch.allclose(table[0], table[1])


def test_command_refuses_a_missing_model_in_one_line(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit, match="not a directory"):
        main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")])


# ---- in the agent ----




def write_table(path, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    path.write_text(json.dumps({f"{n[:-3]}-v1": torch.randn(dim, generator=g).tolist() for n in MT10}))
    return path




def pretrained_agent(tmp_path, *overrides, seed=0, table_seed=0):
    table = write_table(tmp_path / "table.json", seed=table_seed)
    cfg = agent_cfg("agent.multitask.should_use_task_encoder=True", f"{PRETRAINED}.should_use=True",
                    f"{PRETRAINED}.path_to_load_from={table}", *overrides)
    torch.manual_seed(seed)
    return SACAgent(cfg, OBS, ACT, T, "cpu", task_names=NAMES)


def test_agent_loads_the_table_by_task_name_and_trains_only_the_projection(tmp_path):
    agent = pretrained_agent(tmp_path)
    file_table = load_table(tmp_path / "table.json", NAMES)
    torch.testing.assert_close(agent.task_encoder.pretrained, file_table)
    assert all(p is not agent.task_encoder.pretrained for o in agent.optimizers().values()
               for g in o.param_groups for p in g["params"])
    # losses_to_train [critic] (the default): the critic loss reaches the projection, the actor loss does not.
    projection = agent.task_encoder.projection.trunk[0].weight
    critic_params = {id(p) for g in agent.optimizers()["critic"].param_groups for p in g["params"]}
    actor_params = {id(p) for g in agent.optimizers()["actor"].param_groups for p in g["params"]}
    assert id(projection) in critic_params and id(projection) not in actor_params
    before = projection.detach().clone()
    table_before = agent.task_encoder.pretrained.clone()
    agent.update(make_batch(torch.Generator().manual_seed(1), BATCH_IDS), 0)
    assert not torch.equal(projection, before)
    torch.testing.assert_close(agent.task_encoder.pretrained, table_before, rtol=0, atol=0)


def test_task_encoder_gets_gradients_only_from_the_losses_it_is_trained_by(tmp_path):
    agent = pretrained_agent(tmp_path)
    grads = {}
    original = agent.step_optimizer

    def spy(name, loss):
        original(name, loss)
        grads[name] = agent.task_encoder.projection.trunk[0].weight.grad.clone()

    agent.step_optimizer = spy
    agent.update(make_batch(torch.Generator().manual_seed(1), BATCH_IDS), 0)
    assert grads["critic"] is not None and grads["critic"].abs().sum() > 0
    # The actor's and temperature's backward passes leave the encoder untouched (zeroed by the critic's
    # optimizer only on its next step, so a gradient here would have been accumulated by the actor loss).
    assert torch.equal(grads["actor"], grads["critic"]) and torch.equal(grads["alpha"], grads["critic"])


def test_save_resume_is_exact_and_needs_no_file(tmp_path):
    a = pretrained_agent(tmp_path)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        a.update(make_batch(gen, BATCH_IDS), step)
    state = a.training_state()
    (tmp_path / "other").mkdir()
    b = pretrained_agent(tmp_path / "other", seed=7, table_seed=3)  # another random init and another table
    assert not torch.equal(a.task_encoder.pretrained, b.task_encoder.pretrained)
    b.load_training_state(state)
    for (ka, va), (kb, vb) in zip(sorted(a.training_state()["modules"].items()), sorted(b.training_state()["modules"].items())):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
    batch = make_batch(gen, BATCH_IDS)
    torch.manual_seed(5)
    a.update(batch, 3)
    torch.manual_seed(5)
    b.update(batch, 3)
    for va, vb in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_agent_without_task_names_says_so(tmp_path):
    cfg = agent_cfg("agent.multitask.should_use_task_encoder=True", f"{PRETRAINED}.should_use=True",
                    f"{PRETRAINED}.path_to_load_from={write_table(tmp_path / 't.json')}")
    with pytest.raises(ValueError, match="need the env's task names"):
        SACAgent(cfg, OBS, ACT, T, "cpu")
