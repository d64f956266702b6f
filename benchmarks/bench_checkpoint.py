"""Checkpoint write cost of a full MT10 run state against a raw write (+fsync) of the same bytes.

    python benchmarks/bench_checkpoint.py [--dir DIR] [--repeats 3]

State: actor and twin critic (3x400 MLPs, MT10 dims: obs 39, action 4), target critic, three Adam states,
per-task log_alpha, RNG states; replay buffer of 10 tasks x 100,000 transitions (1,000,000; obs 39, action 4).
Rows: full checkpoint (writes the replay base), raw write+fsync of the same number of bytes in the same
directory, an incremental checkpoint after 10,000 env steps (100,000 new rows), and verify + load.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mtrl_hpc import checkpoint  # noqa: E402

T, OBS, ACT, HIDDEN, CAP = 10, 39, 4, 400, 100_000


def mlp(inp, out):
    return torch.nn.Sequential(torch.nn.Linear(inp, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, out))


def run_state():
    actor = mlp(OBS, 2 * ACT)
    critic = torch.nn.ModuleList([mlp(OBS + ACT, 1), mlp(OBS + ACT, 1)])
    target = torch.nn.ModuleList([mlp(OBS + ACT, 1), mlp(OBS + ACT, 1)])
    log_alpha = torch.zeros(T, requires_grad=True)
    opts = {}
    for name, params in (("actor", actor.parameters()), ("critic", critic.parameters()), ("alpha", [log_alpha])):
        params = list(params)
        opt = torch.optim.Adam(params, lr=3e-4)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opts[name] = opt
    return {
        "actor": actor.state_dict(), "critic": critic.state_dict(), "critic_target": target.state_dict(),
        "log_alpha": log_alpha.detach(), **{f"{k}_optimizer": o.state_dict() for k, o in opts.items()},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.default_rng(0).bit_generator.state},
        "step": 1_000_000, "episode": 2000,
    }


def make_replay():
    try:
        from mtrl_hpc.replay import ReplayBuffer

        replay = ReplayBuffer(T, CAP, (OBS,), (ACT,), seed=0)
    except ImportError:  # the compiled extension is not built: a stand-in with the same state_dict
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
        from test_checkpoint import TinyReplay

        replay = TinyReplay(T, CAP, (OBS,), (ACT,))
    sd = replay.state_dict()
    gen = torch.Generator().manual_seed(0)
    for t in checkpoint._flatten(sd).values():
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=gen))
    return replay


def add_env_steps(replay, n):
    """n env steps: one row per task each, as the training loop adds them."""
    ids = np.arange(T)
    obs = torch.randn(n, T, OBS)
    act = torch.randn(n, T, ACT)
    rew = torch.randn(n, T)
    done = torch.zeros(n, T)
    if hasattr(replay, "added") and not hasattr(replay, "total_added"):
        for i in range(n):
            replay.add(obs[i], act[i], rew[i], obs[i], done[i], ids)
    else:
        replay.add(obs, act, rew[..., None], obs, done[..., None] > 0)


def set_full(replay):
    sd = replay.state_dict()
    for name in ("added", "total_added", "size"):
        if name in sd:
            sd[name].fill_(CAP)
    replay.load_state_dict(sd)


def raw_write(path: pathlib.Path, nbytes: int) -> float:
    buf = np.random.default_rng(0).bytes(64 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(buf[:n])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.h5"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under the current dir)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = pathlib.Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir or "."))
    try:
        state = run_state()
        replay = make_replay()
        set_full(replay)
        full, raw, incr, ver, load, sizes, incr_bytes = [], [], [], [], [], [], []
        for r in range(args.repeats):
            run = base / f"run{r}"
            run.mkdir()
            replay_fresh = type(replay).__new__(type(replay))
            replay_fresh.__dict__.update(replay.__dict__)  # a new identity: the first save writes a full base
            t0 = time.perf_counter()
            checkpoint.save(run, 1, state, replay=replay_fresh, config_yaml="env: mt10\n")
            full.append(time.perf_counter() - t0)
            nbytes = dir_bytes(run / "checkpoints")
            sizes.append(nbytes)
            raw.append(raw_write(run / "raw.bin", nbytes))
            (run / "raw.bin").unlink()
            add_env_steps(replay_fresh, 10_000)
            before = dir_bytes(run / "checkpoints")
            t0 = time.perf_counter()
            path = checkpoint.save(run, 2, state, replay=replay_fresh, retain_last_n=2)
            incr.append(time.perf_counter() - t0)
            incr_bytes.append(dir_bytes(run / "checkpoints") - before)
            checkpoint._VERIFIED.clear()
            t0 = time.perf_counter()
            assert checkpoint.find_latest_good(run) == path
            ver.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoint.load(path, replay=replay_fresh)
            load.append(time.perf_counter() - t0)
            shutil.rmtree(run)
        med = statistics.median
        mb = med(sizes) / 1e6
        print(f"MT10 run state: 3x400 actor + twin critic + target + 3 Adam states; replay 1,000,000 transitions "
              f"(obs {OBS}, action {ACT}); median of {args.repeats}; dir {base.parent.resolve()}")
        print(f"{'operation':<52} {'seconds':>8} {'MB':>8} {'MB/s':>8}")
        rows = [("full checkpoint (state + replay base), fsynced", med(full), mb),
                ("raw write of the same bytes + fsync", med(raw), mb),
                ("incremental checkpoint after 10,000 env steps", med(incr), med(incr_bytes) / 1e6),
                ("find_latest_good (verify chain checksums)", med(ver), mb + med(incr_bytes) / 1e6),
                ("load (state + replay chain restore)", med(load), mb + med(incr_bytes) / 1e6)]
        for name, sec, size in rows:
            print(f"{name:<52} {sec:>8.3f} {size:>8.1f} {size / sec:>8.0f}")
        print(f"ratio full checkpoint / raw write: {med(full) / med(raw):.2f}x (target < 1.5x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
