"""Checkpoints: exact round trips, atomicity under kill -9, verification, rotation, incremental replay chains."""

import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap
import warnings

import h5py
import numpy as np
import pytest
import torch

from mtrl_hpc import checkpoint
from mtrl_hpc.checkpoint import CheckpointError
from mtrl_hpc.replay import ReplayBuffer

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_replay(num_tasks, capacity_per_task, obs_shape, action_shape, seed=0, obs_dtype=torch.float32):
    return ReplayBuffer(num_tasks, capacity_per_task, obs_shape, action_shape, seed=seed, obs_dtype=obs_dtype)


def fill(replay, steps, gen, tasks=None):
    """Adds ``steps`` env steps of one row per task in ``tasks`` (default: all) with a single add call."""
    tasks = list(range(replay.num_tasks)) if tasks is None else list(tasks)
    n = steps * len(tasks)
    if n == 0:
        return
    obs = torch.randn(n, *replay.obs_shape, generator=gen)
    replay.add(obs, torch.randn(n, *replay.action_shape, generator=gen), torch.randn(n, generator=gen), obs + 1,
               torch.rand(n, generator=gen) < 0.1, np.array(tasks * steps, dtype=np.int64))


def replay_state(replay):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in replay.state_dict().items()}


def assert_same(a, b, where="state"):
    if isinstance(a, dict):  # an OrderedDict (torch state_dict) comes back as a dict with the same order
        assert type(b) is dict, where
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
        return
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 and a.dtype.is_floating_point else a,
                           b.view(torch.uint8) if b.dtype.itemsize == 1 and b.dtype.is_floating_point else b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), where
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


def rich_state():
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    opt = torch.optim.Adam(net.parameters(), lr=3e-4, betas=(0.9, 0.999))
    net(torch.randn(3, 5)).sum().backward()
    opt.step()
    return {
        "actor": net.state_dict(),
        "actor_optimizer": opt.state_dict(),
        "log_alpha": torch.randn(10, generator=g, dtype=torch.float64).requires_grad_(),
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "scalar_tensor": torch.tensor(3, dtype=torch.int32),
        "empty": torch.zeros(0, 3),
        "flags": torch.tensor([True, False]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "nd": np.arange(6, dtype=np.int16).reshape(2, 3),
        "nd_bool": np.array([True, False]),
        "np_scalar": np.float32(1.5),
        "i": 7, "big": 2**100 + 1, "neg": -(2**70), "f": 0.1, "nan": float("nan"), "inf": float("-inf"),
        "b": True, "s": "héllo / wörld", "empty_s": "", "none": None, "raw": b"\x00\x01\xff",
        "ints": [1, 2, 3], "floats": [0.5, 1.5], "strs": ["a", "b/c"], "mixed": [1, "a", None, [2.0]],
        "tuple": (0.9, 0.999), "empty_list": [], "nested": {"a.b": {"c/d": {3: "x", "#": 1, "%2F": 2}}},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.default_rng(1).bit_generator.state,
        "legacy_rng": tuple(np.random.RandomState(0).get_state()),
    }


def test_round_trip_every_leaf_type(tmp_path):
    state = rich_state()
    path = checkpoint.save(tmp_path, 100, state, config_yaml="env:\n  name: mt10\n")
    assert path == tmp_path / "checkpoints" / "step_000000000100.h5"
    checkpoint.verify(path)
    loaded, config = checkpoint.load(path)
    assert config == "env:\n  name: mt10\n"
    state["log_alpha"] = state["log_alpha"].detach()
    assert_same(state, loaded)
    # what the loop does with it: optimizers and RNGs accept the restored states
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    net.load_state_dict(loaded["actor"])
    torch.optim.Adam(net.parameters()).load_state_dict(loaded["actor_optimizer"])
    torch.set_rng_state(loaded["torch_rng"])
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded["numpy_rng"]
    np.random.RandomState().set_state(loaded["legacy_rng"])


def test_versions_and_permissions(tmp_path):
    old = os.umask(0)
    try:
        path = checkpoint.save(tmp_path / "run", 1, {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    with h5py.File(path, "r") as f:
        for lib in ("python", "torch", "numpy", "h5py", "mtrl_hpc", "metaworld"):
            assert f.attrs[f"version_{lib}"]
        assert f.attrs["format_version"] == checkpoint.FORMAT_VERSION


def test_unsupported_values_are_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="state.*object"):
        checkpoint.save(tmp_path, 1, {"o": object()})
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.save(tmp_path, 1, {"o": np.array([object()])})
    assert not list((tmp_path / "checkpoints").iterdir())  # no temp file left behind


def test_damaged_and_foreign_files_raise_clear_errors(tmp_path):
    good = checkpoint.save(tmp_path, 1, {"w": torch.randn(1000)})
    data = good.read_bytes()
    cases = {}
    cases["truncated"] = data[: len(data) // 2]
    cases["random"] = np.random.default_rng(0).bytes(len(data))
    flipped = bytearray(data)
    with h5py.File(good, "r") as f:
        offset = f["state/w"].id.get_offset()
    flipped[offset + 17] ^= 0xFF
    cases["flipped"] = bytes(flipped)
    for name, content in cases.items():
        p = tmp_path / f"{name}.h5"
        p.write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(p)
        assert str(p) in str(e.value) and "delete it" in str(e.value), (name, e.value)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(CheckpointError, match="not a mtrl_hpc.checkpoint file"):
        checkpoint.verify(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.verify(tmp_path / "nope.h5")
    # a modified attribute is caught too
    with h5py.File(good, "r+") as f:
        f["state/w"].attrs["torch_dtype"] = "torch.float64"
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.verify(good)


@pytest.mark.parametrize("retain", [-1, 0, 1, 3])
def test_rotation(tmp_path, retain):
    for step in range(0, 50, 10):
        checkpoint.save(tmp_path, step, {"step": step}, retain_last_n=retain)
    steps = sorted(int(p.stem[5:]) for p in (tmp_path / "checkpoints").glob("step_*.h5"))
    expected = {-1: [0, 10, 20, 30, 40], 0: [40], 1: [40], 3: [20, 30, 40]}[retain]
    assert steps == expected
    checkpoint.finish_run(tmp_path, retain)
    steps = sorted(int(p.stem[5:]) for p in (tmp_path / "checkpoints").glob("step_*.h5"))
    assert steps == ([] if retain == 0 else expected)


def test_find_latest_good_skips_damaged_newest_with_warning(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, step, {"step": step}, retain_last_n=-1)
    ck = tmp_path / "checkpoints"
    p30 = ck / "step_000000000030.h5"
    p30.write_bytes(p30.read_bytes()[:-200])
    (ck / "step_000000000040.h5").write_bytes(b"not hdf5 at all")
    (ck / f"{checkpoint._TMP_PREFIX}123-abcd-step_000000000050.h5").write_bytes(b"partial")
    with pytest.warns(RuntimeWarning) as record:
        latest = checkpoint.find_latest_good(tmp_path)
    assert latest == ck / "step_000000000020.h5"
    messages = " ".join(str(w.message) for w in record)
    assert "step_000000000040.h5" in messages and "step_000000000030.h5" in messages
    assert not any(p.name.startswith(checkpoint._TMP_PREFIX) for p in ck.iterdir())
    assert checkpoint.load(latest)[0] == {"step": 20}
    # continuing from step 20 replaces the abandoned newer files instead of being outranked by them
    with pytest.warns(RuntimeWarning, match="newer than step 25"):
        checkpoint.save(tmp_path, 25, {"step": 25}, retain_last_n=1)
    assert [p.name for p in ck.glob("step_*.h5")] == ["step_000000000025.h5"]
    assert checkpoint.find_latest_good(tmp_path / "elsewhere") is None


def test_check_compatible():
    saved = {"env": {"name": "metaworld-mt10", "num_envs": 10}, "agent": {"name": "sac"}, "setup": {"seed": 1}}
    current = {"env": {"name": "metaworld-mt50", "num_envs": 50}, "agent": {"name": "sac"}, "setup": {"seed": 1}}
    checkpoint.check_compatible(saved, saved, ["env.name", "agent.name"])
    with pytest.raises(CheckpointError) as e:
        checkpoint.check_compatible(saved, current, ["env.name", "env.num_envs", "agent.name", "agent.missing",
                                                     "setup.extra"])
    msg = str(e.value)
    assert "env.name: checkpoint has metaworld-mt10, this run has metaworld-mt50" in msg
    assert "env.num_envs: checkpoint has 10, this run has 50" in msg
    assert "agent.name" not in msg and "should_resume=False" in msg
    current["setup"]["extra"] = 3
    with pytest.raises(CheckpointError, match="setup.extra: checkpoint has <missing>, this run has 3"):
        checkpoint.check_compatible(saved, current, ["setup.extra"])


# ------------------------------------------------------------------------------------------ replay chains


def replay_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "checkpoints" / "replay").glob("seg_*.h5"))


@pytest.mark.parametrize("obs_dtype", [torch.float32, torch.bfloat16])
def test_incremental_replay_chain_is_exact(tmp_path, obs_dtype):
    gen = torch.Generator().manual_seed(0)
    T, C = 3, 16
    replay = make_replay(T, C, (4,), (2,), seed=7, obs_dtype=obs_dtype)
    snapshots, sizes = {}, {}
    step = 0
    rng = np.random.default_rng(0)
    for i in range(25):
        n = int(rng.integers(0, 12))
        fill(replay, n, gen)
        if i % 4 == 3:  # uneven per-task adds
            fill(replay, int(rng.integers(1, 20)), gen, tasks=[1])
        step += n + 1
        if replay.ready:
            replay.sample(5)  # the sample counter is part of the restored state
        path = checkpoint.save(tmp_path, step, {"step": step}, replay=replay, retain_last_n=-1)
        snapshots[path] = replay_state(replay)
        with h5py.File(path, "r") as f:
            sizes[path] = int(f["replay/chain_rows"][()])
    assert max(sizes.values()) <= T * C  # delta rows after the base
    segs = replay_files(tmp_path)
    kinds = []
    for s in segs:
        with h5py.File(tmp_path / "checkpoints" / "replay" / s, "r") as f:
            kinds.append(f.attrs["kind"])
    assert kinds.count("base") >= 2 and kinds.count("delta") >= 10  # wrapped around and re-based
    for path, expected in snapshots.items():  # every retained checkpoint restores its own buffer exactly
        fresh = make_replay(T, C, (4,), (2,), obs_dtype=obs_dtype)
        checkpoint.load(path, replay=fresh)
        assert_same(expected, fresh.state_dict())


def test_replay_chain_rotation_keeps_needed_segments(tmp_path):
    gen = torch.Generator().manual_seed(1)
    T, C = 2, 50
    replay = make_replay(T, C, (3,), (1,))
    for step in range(1, 12):
        fill(replay, 7, gen)
        checkpoint.save(tmp_path, step, {}, replay=replay, retain_last_n=2)
        ck = tmp_path / "checkpoints"
        retained = sorted(ck.glob("step_*.h5"))
        needed = set()
        for p in retained:
            checkpoint.verify(p)
            with h5py.File(p, "r") as f:
                needed |= {s.decode() if isinstance(s, bytes) else s for s in f["replay/chain"][()]}
        assert set(replay_files(tmp_path)) == needed
    # resume in a "new process": load the older retained checkpoint, continue, and the chain forks cleanly
    older = sorted((tmp_path / "checkpoints").glob("step_*.h5"))[0]
    fresh = make_replay(T, C, (3,), (1,))
    checkpoint.load(older, replay=fresh)
    fill(fresh, 3, gen)
    with pytest.warns(RuntimeWarning, match="newer than step 10"):
        p = checkpoint.save(tmp_path, 10, {}, replay=fresh, retain_last_n=2)
    with h5py.File(p, "r") as f:
        assert f["replay/chain"].shape[0] > 1  # continued the loaded chain with a delta
    again = make_replay(T, C, (3,), (1,))
    checkpoint.load(checkpoint.find_latest_good(tmp_path), replay=again)
    assert_same(fresh.state_dict(), again.state_dict())


def test_replay_delta_writes_only_new_rows(tmp_path):
    gen = torch.Generator().manual_seed(2)
    replay = make_replay(4, 1000, (39,), (4,))
    fill(replay, 300, gen)
    checkpoint.save(tmp_path, 1, {}, replay=replay)
    fill(replay, 25, gen)
    p = checkpoint.save(tmp_path, 2, {}, replay=replay)
    with h5py.File(p, "r") as f:
        last = f["replay/chain"][-1]
    last = last.decode() if isinstance(last, bytes) else last
    with h5py.File(tmp_path / "checkpoints" / "replay" / last, "r") as f:
        assert f.attrs["kind"] == "delta"
        assert f["replay/obs"].shape == (4 * 25, 39)
        assert f["replay/since"][()].tolist() == [300] * 4 and f["replay/added"][()].tolist() == [325] * 4


def test_missing_or_swapped_segment_is_detected(tmp_path):
    gen = torch.Generator().manual_seed(3)
    replay = make_replay(2, 8, (2,), (1,))
    fill(replay, 5, gen)
    checkpoint.save(tmp_path, 1, {}, replay=replay, retain_last_n=-1)
    fill(replay, 2, gen)
    p2 = checkpoint.save(tmp_path, 2, {}, replay=replay, retain_last_n=-1)
    segdir = tmp_path / "checkpoints" / "replay"
    segs = sorted(segdir.iterdir())
    segs[1].unlink()
    with pytest.warns(RuntimeWarning, match="missing"):
        assert checkpoint.find_latest_good(tmp_path).name == "step_000000000001.h5"
    with pytest.raises(CheckpointError, match="8 rows but this one has 2 x 9.*checkpoint's config"):
        checkpoint.load(tmp_path / "checkpoints" / "step_000000000001.h5", replay=make_replay(2, 9, (2,), (1,)))
    with pytest.raises(CheckpointError, match="holds no replay"):
        checkpoint.load(checkpoint.save(tmp_path / "b", 1, {}), replay=replay)
    assert p2.exists()


# ------------------------------------------------------------------------------------------ kill -9

WRITER = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from mtrl_hpc import checkpoint
    from test_checkpoint import make_replay, fill
    run, kill_at_fsync = sys.argv[1], int(sys.argv[2])
    gen = torch.Generator().manual_seed(0)
    replay = make_replay(2, 20000, (39,), (4,))
    fill(replay, 20000, gen)
    checkpoint.save(run, 1, {{"w": torch.ones(10), "step": 1}}, replay=replay)
    print("first", flush=True)
    fill(replay, 500, gen)
    calls = [0]
    real_fsync = os.fsync
    def fsync(fd):
        calls[0] += 1
        if calls[0] == kill_at_fsync:
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)
    os.fsync = fsync
    big = {{"w": torch.randn(4_000_000), "step": 2}}
    while True:  # keep writing new checkpoints until killed
        checkpoint.save(run, 2, big, replay=replay)
        if kill_at_fsync > 0:
            sys.exit(3)
""")


def _run_writer(tmp_path, run, kill_at_fsync, kill_after=None):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(REPO / "tests")))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(kill_at_fsync)], stdout=subprocess.PIPE,
                            env=env)
    assert proc.stdout.readline().strip() == b"first"
    if kill_after is not None:
        import time
        time.sleep(kill_after)
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kill_at_fsync,kill_after", [(1, None), (2, None), (3, None), (4, None), (0, 0.05), (0, 0.4)])
def test_kill_9_while_writing_leaves_a_good_checkpoint(tmp_path, kill_at_fsync, kill_after):
    """fsync calls of one save: 1 replay segment file, 2 its directory, 3 checkpoint file, 4 its directory."""
    run = tmp_path / "run"
    _run_writer(tmp_path, run, kill_at_fsync, kill_after)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latest = checkpoint.find_latest_good(run)
    assert latest is not None
    replay = make_replay(2, 20000, (39,), (4,))
    state, _ = checkpoint.load(latest, replay=replay)
    assert state["step"] in (1, 2)
    expected = make_replay(2, 20000, (39,), (4,))
    gen = torch.Generator().manual_seed(0)
    fill(expected, 20000, gen)
    if state["step"] == 2:
        fill(expected, 500, gen)
    assert_same(expected.state_dict(), replay.state_dict())
    if kill_at_fsync == 4:  # the rename happened: the new checkpoint is the latest good one
        assert state["step"] == 2
    if kill_at_fsync in (1, 2, 3):
        assert state["step"] == 1
    assert not any(p.name.startswith(checkpoint._TMP_PREFIX) for p in (run / "checkpoints").rglob("*"))


def test_real_replay_buffer_chain_is_exact_and_sampling_continues(tmp_path):
    T, C = 3, 40
    make = lambda seed=0: ReplayBuffer(T, C, (5,), (2,), seed=seed, obs_dtype=torch.bfloat16)  # noqa: E731
    replay = make(seed=11)
    gen = torch.Generator().manual_seed(0)
    expected = {}
    for step in range(1, 31):
        for _ in range(int(torch.randint(0, 9, (1,), generator=gen))):
            ids = [0, 1, 2] if step % 5 else [1, 1, 2]  # uneven per-task adds now and then
            replay.add(torch.randn(3, 5, generator=gen), torch.randn(3, 2, generator=gen),
                       torch.randn(3, generator=gen), torch.randn(3, 5, generator=gen),
                       torch.rand(3, generator=gen) < 0.1, ids)
        if replay.ready:
            replay.sample(7)
        path = checkpoint.save(tmp_path, step, {"step": step}, replay=replay, retain_last_n=4)
        expected[path] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in replay.state_dict().items()}
    kinds = []
    for p in (tmp_path / "checkpoints" / "replay").iterdir():
        with h5py.File(p, "r") as f:
            kinds.append(f.attrs["kind"])
    assert "delta" in kinds
    retained = sorted((tmp_path / "checkpoints").glob("step_*.h5"))
    assert len(retained) == 4
    for path in retained:
        fresh = make()
        checkpoint.load(path, replay=fresh)
        for k, v in expected[path].items():
            got = fresh.state_dict()[k]
            assert (torch.equal(v, got) if isinstance(v, torch.Tensor) else v == got), (path.name, k)
    fresh = make()
    checkpoint.load(retained[-1], replay=fresh)
    assert torch.equal(replay.sample(9).obs, fresh.sample(9).obs)  # the sampler continues identically


def test_truncation_anywhere_gives_checkpoint_error(tmp_path):
    gen = torch.Generator().manual_seed(4)
    replay = make_replay(2, 64, (5,), (2,))
    fill(replay, 50, gen)
    path = checkpoint.save(tmp_path / "run", 1, {"w": torch.randn(3000), "s": "x"}, replay=replay)
    seg = next((tmp_path / "run" / "checkpoints" / "replay").iterdir())
    for original in (path, seg):
        data = original.read_bytes()
        for cut in np.linspace(0, len(data) - 1, 16).astype(int):
            original.write_bytes(data[:cut])
            checkpoint._VERIFIED.clear()
            with pytest.raises(CheckpointError):
                checkpoint.load(path, replay=make_replay(2, 64, (5,), (2,)))
        original.write_bytes(data)
    checkpoint.load(path, replay=make_replay(2, 64, (5,), (2,)))
