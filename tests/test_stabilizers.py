"""The stabilisers of the update: reward normalisation, weight init schemes, the divergence guard, and the
checkpoint format version that records the normaliser's state."""

import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from mtrl_hpc import checkpoint
from mtrl_hpc.divergence import DivergenceGuard, Diverged
from mtrl_hpc.nets.mlp import StackedLinear, StackedMLP, init_weights
from mtrl_hpc.reward_normalization import RewardNormalizer
from test_resume import RUN, assert_same_run, checkpoint_steps, final_state, finish, last_train_step, start, wait_for
from test_train import TINY


def garage_normalized_rewards(rewards, alpha=1e-3):
    """garage's NormalizedEnv reward path, one env, written out: update mean, then var, then scale."""
    mean, var, out = 0.0, 1.0, []
    for r in rewards:
        mean = (1 - alpha) * mean + alpha * r
        var = (1 - alpha) * var + alpha * (r - mean) ** 2
        out.append(r / (var ** 0.5 + 1e-8))
    return np.array(out)


def test_reward_normalizer_matches_garage_per_task():
    rng = np.random.default_rng(0)
    rewards = rng.uniform(0, 10, size=(3000, 3)) * np.array([1.0, 0.1, 5.0])  # three tasks, three scales
    norm = RewardNormalizer(3)
    got = np.stack([norm(r) for r in rewards])
    for t in range(3):
        np.testing.assert_allclose(got[:, t], garage_normalized_rewards(rewards[:, t]), rtol=1e-6)
    # After warm-up, each task's scaled rewards have a comparable spread whatever its reward scale.
    spread = got[-1000:].std(0)
    assert spread.max() / spread.min() < 1.5
    assert got.dtype == np.float32


def test_reward_normalizer_state_round_trip_continues_exactly():
    rng = np.random.default_rng(1)
    a, b = RewardNormalizer(2), RewardNormalizer(2)
    for r in rng.uniform(0, 1, size=(50, 2)):
        a(r)
    b.load_state_dict(a.state_dict())
    for r in rng.uniform(0, 1, size=(20, 2)):
        np.testing.assert_array_equal(a(r), b(r))
    with pytest.raises(ValueError, match="for 2 tasks, this run has 3"):
        RewardNormalizer(3).load_state_dict(a.state_dict())


def test_orthogonal_init_gives_orthonormal_columns_and_zero_bias():
    torch.manual_seed(0)
    layer = StackedLinear(3, 64, 16)
    for w in layer.weight.detach():  # [in, out]: the [out, in] matrix has orthonormal rows
        torch.testing.assert_close(w.T @ w, torch.eye(16), atol=1e-5, rtol=0)
    assert not layer.bias.detach().any()


def test_pytorch_default_init_matches_nn_linear_distribution():
    torch.manual_seed(0)
    mlp = StackedMLP(2, 300, 200, 5, 2)
    init_weights(mlp, "pytorch_default")
    for layer in mlp.trunk:
        fan_in = layer.weight.shape[1]
        ref = torch.nn.Linear(fan_in, layer.weight.shape[2])  # PyTorch's own init, for its bounds and spread
        bound = 1 / fan_in ** 0.5
        for p, ref_p in ((layer.weight, ref.weight), (layer.bias, ref.bias)):
            p = p.detach()
            assert p.abs().max() <= bound and ref_p.abs().max() <= bound
            assert abs(p.std().item() - ref_p.std().item()) < 0.15 * ref_p.std().item()
    with pytest.raises(ValueError, match="choose one of orthogonal, pytorch_default"):
        init_weights(mlp, "xavier")


class Params(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, value]))


@pytest.mark.parametrize("means, params, needle", [
    ({"critic_loss": np.float64("nan"), "actor_loss": 1.0}, 0.0, "critic_loss became nan in the updates of steps 10-20"),
    ({"critic_loss": 1.0, "alpha_loss": np.float64("inf")}, 0.0, "alpha_loss became inf"),
    ({"critic_loss": 2e5}, 0.0, "critic_loss=2e+05 crossed experiment.critic_loss_ceiling=100000"),
    ({"critic_loss": 1.0}, float("nan"), "parameter w became non-finite"),
])
def test_divergence_guard_names_what_diverged(tmp_path, means, params, needle):
    guard = DivergenceGuard(Params(params), 1e5, tmp_path)
    with pytest.raises(Diverged) as info:
        guard.check(means, first_step=10, last_step=20)
    assert needle in str(info.value) and "no checkpoint was written" in str(info.value)
    DivergenceGuard(Params(0.0), None, tmp_path).check({"critic_loss": 1e30}, 0, 1)  # null ceiling: no limit


def test_diverged_run_stops_with_status_4_and_saves_nothing_after(tmp_path):
    # A ceiling no real loss stays under: the guard fires at the first episode boundary with updates (step 30).
    status, out, err = finish(start(tmp_path, "experiment.critic_loss_ceiling=1e-9"))
    assert status == 4, err[-2000:]
    line = [l for l in err.splitlines() if l.startswith("mtrl_hpc:")]
    assert len(line) == 1 and "Traceback" not in err
    assert "critic_loss=" in line[0] and "in the updates of steps 20-30" in line[0]
    # The checkpoint of step 20 (before any update) is the last one, and the message names it.
    assert checkpoint_steps(tmp_path) == [20] and "step_000000000020.h5" in line[0]
    assert checkpoint.find_latest_good(tmp_path) is not None
    # The metric log is complete and readable, its last row is the diverged episode.
    assert last_train_step(tmp_path) == 30


def test_reward_normalization_resumes_exactly(tmp_path_factory):
    flag = "env.builder.make_kwargs.should_perform_reward_normalization=true"
    whole = tmp_path_factory.mktemp("whole")
    status, _, err = finish(start(whole, flag))
    assert status == 0, err[-3000:]
    cut = tmp_path_factory.mktemp("cut")
    proc = start(cut, flag)
    wait_for(lambda: last_train_step(cut) >= 50, proc)
    proc.send_signal(__import__("signal").SIGUSR1)
    status, _, err = finish(proc)
    assert status == 3, err[-3000:]
    status, _, err = finish(start(cut, flag))
    assert status == 0, err[-3000:]
    assert_same_run(final_state(cut), final_state(whole))
    # The normaliser really ran: the rewards the agent learned from are not MetaWorld's.
    plain = tmp_path_factory.mktemp("plain")
    status, _, err = finish(start(plain, "experiment.num_train_steps=40", flag.replace("true", "false")))
    with h5py.File(whole / "metrics.h5") as a, h5py.File(plain / "metrics.h5") as b:
        assert not np.allclose(a["train/batch_reward"][2:4], b["train/batch_reward"][2:4])


def test_checkpoint_of_an_older_format_is_refused_not_restarted(tmp_path):
    status, _, err = finish(start(tmp_path, "experiment.num_train_steps=20"))
    assert status == 0, err[-3000:]
    path = checkpoint.latest_path(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
    status, out, err = finish(start(tmp_path, "experiment.num_train_steps=40"))
    assert status == 2 and "Traceback" not in err
    assert "format_version 1, written by an older mtrl_hpc" in err and "start the run in a new directory" in err
    assert checkpoint_steps(tmp_path) == [20] and last_train_step(tmp_path) == 20
