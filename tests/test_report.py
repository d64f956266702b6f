"""Report: table, CSV and curves checked against numpy on the HDF5 files, plots (no layout warnings, a lone
eval row visible, a legend per configuration), grouping, short labels, errors."""

import csv
import math
import os
import pathlib
import re
import stat
import subprocess
import sys

import h5py
import matplotlib
import numpy as np
import pytest
import yaml

from mtrl_hpc import report
from mtrl_hpc.metrics import MetricsLog

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = ["reach", "push", "pick"]
EVAL_STEPS = [0, 1000, 2000, 3000]  # step 0: the untrained policy, not counted as best


def write_run(run_dir, config, success, reward, train_rows=0, rng=None):
    """success: [N, T] per-task eval success; reward: [N, T]; train_rows: rows every 100 steps with random
    losses (from step 500: the first rows have none, as before updates start)."""
    run_dir.mkdir(parents=True)
    if config is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with MetricsLog(run_dir / "metrics.h5", TASKS, console=False) as log:
        for i in range(train_rows):
            step = 100 * (i + 1)
            succ = rng.integers(0, 2, size=len(TASKS)).astype(float)
            row = {"episode": i, "success": succ.mean()}
            if step >= 500:
                critic = rng.uniform(1, 100, size=len(TASKS))
                row.update(critic_loss=critic.mean(), actor_loss=rng.normal(), alpha_value=rng.uniform(0.01, 1))
                log.log("train", step, row, {"success": succ, "critic_loss": critic})
            else:
                log.log("train", step, row, {"success": succ})
        for i, step in enumerate(EVAL_STEPS[: len(success)]):
            log.log("eval", step, {"success": float(success[i].mean()), "episode_reward": float(reward[i].mean())},
                    {"success": success[i], "episode_reward": reward[i]})


@pytest.fixture
def sweep(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    data = {}
    job = 0
    for agent in ("mtsac", "pcgrad"):
        for seed in (1, 2, 3):
            success = rng.integers(0, 11, size=(4, 3)) / 10
            reward = rng.normal(100, 10, size=(4, 3))
            cfg = {"agent": {"name": agent, "lr": 3e-4}, "setup": {"seed": seed}, "env": {"name": "mt3"}}
            write_run(root / str(job), cfg, success, reward, train_rows=30, rng=rng)
            data.setdefault(agent, []).append((success, reward))
            job += 1
    return root, data


def se(x):
    x = np.asarray(x, dtype=float)
    return x.std(ddof=1) / math.sqrt(len(x))


def parse_table(text):
    """{group label: {row name: (final mean, final se, best mean, best se)}} from the printed table."""
    out, label = {}, None
    for line in text.splitlines():
        if line.startswith("== "):
            label = line[3:].split("  (")[0]
            out[label] = {}
        elif label and line and not line.startswith("task"):
            name = line.split()[0]
            nums = [float(x) for x in re.findall(r"-?\d+\.\d+", line)]
            out[label][name] = tuple(nums)
    return out


def h5_runs(root, jobs):
    """{name: [N, T] eval success per task, overall: [N], step: [N], train: {...}} of each job, read with h5py."""
    out = []
    for job in jobs:
        with h5py.File(root / str(job) / "metrics.h5", "r") as f:
            out.append({"step": f["eval/step"][()], "success": f["eval/success_env_index_"][()],
                        "overall": f["eval/success"][()], "train_step": f["train/step"][()],
                        "critic_loss": f["train/critic_loss"][()]})
    return out


def reference(runs):
    """{row name: (final mean, final se, best mean, best se)} in plain numpy; best leaves out step 0."""
    final = np.array([r["success"][-1] for r in runs])  # [runs, T]
    best = np.array([r["success"][r["step"] > 0].max(axis=0) for r in runs])
    out = {name: (final[:, t].mean(), se(final[:, t]), best[:, t].mean(), se(best[:, t]))
           for t, name in enumerate(TASKS)}
    f = np.array([r["overall"][-1] for r in runs])
    b = np.array([r["overall"][r["step"] > 0].max() for r in runs])
    out["overall"] = (f.mean(), se(f), b.mean(), se(b))
    return out


def test_table_csv_and_curves_match_numpy(sweep, tmp_path):
    root, _ = sweep
    table, groups, files = report.make_report(root, tmp_path / "out")
    parsed = parse_table(table)
    assert set(parsed) == {"agent.name=mtsac", "agent.name=pcgrad"}
    with open(tmp_path / "out" / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["group", "agent.name", "runs", "pending", "last_step_min", "last_step_max", "task",
                             "final_mean", "final_se", "best_mean", "best_se"]
    assert len(rows) == 2 * (len(TASKS) + 1)
    for agent, jobs in (("mtsac", [0, 1, 2]), ("pcgrad", [3, 4, 5])):
        want = reference(h5_runs(root, jobs))
        label = f"agent.name={agent}"
        for name, numbers in want.items():
            np.testing.assert_allclose(parsed[label][name], numbers, atol=6e-5)
            (row,) = [r for r in rows if r["group"] == label and r["task"] == name]
            assert row["agent.name"] == agent and row["runs"] == "3" and row["last_step_max"] == "3000"
            np.testing.assert_allclose([float(row[k]) for k in ("final_mean", "final_se", "best_mean", "best_se")],
                                       numbers, rtol=1e-12)
    names = sorted(p.name for p in files)
    assert names == ["agent.name=mtsac.png", "agent.name=mtsac_tasks.png", "agent.name=pcgrad.png",
                     "agent.name=pcgrad_tasks.png", "comparison.png", "comparison_tasks.png", "report.csv",
                     "report.txt"]
    for p in files:
        assert p.stat().st_size > 0 and stat.S_IMODE(p.stat().st_mode) == 0o644
    assert (tmp_path / "out" / "report.txt").read_text() == table
    # the curves are the per-step mean and s.e. across seeds, eval and train
    runs = h5_runs(root, [0, 1, 2])
    steps, mean, err = report.curve([(r.steps, r.overall_success) for r in groups[0].runs])
    succ = np.stack([r["overall"] for r in runs])
    np.testing.assert_array_equal(steps, EVAL_STEPS)
    np.testing.assert_allclose(mean, succ.mean(axis=0))
    np.testing.assert_allclose(err, succ.std(axis=0, ddof=1) / math.sqrt(3))
    steps, mean, err = report.curve([(r.train_steps, r.train["critic_loss"]) for r in groups[0].runs])
    loss = np.stack([r["critic_loss"] for r in runs])  # NaN before step 500: no point there
    np.testing.assert_array_equal(steps, runs[0]["train_step"])
    assert np.isnan(mean[:4]).all() and np.isnan(err[:4]).all()
    np.testing.assert_allclose(mean[4:], loss[:, 4:].mean(axis=0))
    np.testing.assert_allclose(err[4:], loss[:, 4:].std(axis=0, ddof=1) / math.sqrt(3))


def test_curve_counts_the_runs_holding_a_step():
    a = (np.array([0, 10, 20, 20]), np.array([1.0, 2.0, 5.0, 3.0]))  # step 20 twice: the last row counts
    b = (np.array([10, 30]), np.array([4.0, np.nan]))
    steps, mean, err = report.curve([a, b, (np.zeros(0), np.zeros(0))])
    np.testing.assert_array_equal(steps, [0, 10, 20, 30])
    np.testing.assert_allclose(mean, [1.0, 3.0, 3.0, np.nan])
    np.testing.assert_allclose(err, [np.nan, np.std([2.0, 4.0], ddof=1) / math.sqrt(2), np.nan, np.nan])


def test_binned_train_rows():
    rng = np.random.default_rng(3)
    steps = np.arange(100, 10_001, 100)
    values = rng.normal(size=len(steps))
    values[[3, 40]] = np.nan
    assert report.bin_width(1_000_000) == 10_000 and report.bin_width(150_000) == 2000 and report.bin_width(90) == 1
    centres, means = report.binned(steps, values, 1000)
    want_c, want_m = [], []
    for lo in range(0, 11_000, 1000):
        v = values[(steps >= lo) & (steps < lo + 1000)]
        v = v[np.isfinite(v)]
        if len(v):
            want_c.append(lo + 500)
            want_m.append(v.mean())
    np.testing.assert_array_equal(centres, want_c)
    np.testing.assert_allclose(means, want_m)


def test_short_labels():
    keys = ["agent.actor.lr", "agent.critic.lr", "agent.multitask.should_use_disentangled_alpha", "env.name",
            "agent.name"]
    assert report.short_keys(keys) == {"agent.actor.lr": "actor.lr", "agent.critic.lr": "critic.lr",
                                       "agent.multitask.should_use_disentangled_alpha": "disentangled_alpha",
                                       "env.name": "env.name", "agent.name": "agent.name"}


def colour_pixels(png, rgb) -> int:
    image = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(image - np.asarray(rgb)).max(axis=2) < 0.02).sum())


@pytest.mark.filterwarnings("error")
def test_plots_of_many_configurations(tmp_path):
    """Five configurations (one with a single eval row, at step 0), long keys, train rows binned (more than
    TRAIN_BINS): no matplotlib warning, a short legend label each, the lone eval point drawn."""
    rng = np.random.default_rng(4)
    root = tmp_path / "sweep"
    job = 0
    for lr in (1e-4, 3e-4, 1e-3):
        for alpha in (True, False):
            if (lr, alpha) == (1e-3, False):
                continue
            rows = 1 if (lr, alpha) == (1e-4, True) else 4
            for seed in (1, 2):
                cfg = {"agent": {"optimizers": {"actor": {"lr": lr}},
                                 "multitask": {"should_use_disentangled_alpha": alpha}},
                       "setup": {"seed": seed}}
                s = rng.uniform(size=(rows, 3))
                write_run(root / str(job), cfg, s, s * 100, train_rows=120 if rows > 1 else 0, rng=rng)
                job += 1
    table, groups, files = report.make_report(root, tmp_path / "out")
    assert len(groups) == 5
    assert {g.short for g in groups} == {f"disentangled_alpha={a}, lr={lr}" for a, lr in
                                         [(True, 0.0001), (False, 0.0001), (True, 0.0003), (False, 0.0003),
                                          (True, 0.001)]}
    assert all(g.label.startswith("agent.multitask.should_use_disentangled_alpha=") for g in groups)
    (lone,) = [g for g in groups if g.short == "disentangled_alpha=True, lr=0.0001"]
    assert all(len(r.steps) == 1 for r in lone.runs)
    assert "last eval step 0" in table  # and its best is "-": no evaluation after step 0 yet
    assert re.search(r"overall\s+\d\.\d{4} ± \d\.\d{4}\s+-$", table, re.M)
    assert {p.name for p in files} >= {"comparison.png", "comparison_tasks.png", "report.csv"}
    # the lone group's own figure: its colour (tab10, by its place among the groups) is drawn
    color = matplotlib.colormaps["tab10"](groups.index(lone))[:3]
    own = tmp_path / "out" / (report._slug(lone.label) + ".png")
    assert colour_pixels(own, color) > 50
    assert colour_pixels(own.with_name(own.stem + "_tasks.png"), color) > 50
def test_runs_still_writing_and_uneven_progress(tmp_path):
    root = tmp_path / "sweep"
    success = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    write_run(root / "0", {"setup": {"seed": 0}}, success, success * 10)
    write_run(root / "1", {"setup": {"seed": 1}}, success[:2], success[:2] * 10)
    write_run(root / "2", {"setup": {"seed": 2}}, success[:0], success[:0])  # no eval row yet
    with MetricsLog.resume(root / "1" / "metrics.h5", TASKS, last_step=10**9, console=False) as live:
        live.log("eval", 5000, per_task={"success": [1.0, 1.0, 1.0]})  # open for writing while reporting
        table, groups, _ = report.make_report(root, tmp_path / "out")
    assert len(groups) == 1 and groups[0].label == "sweep"
    assert not (tmp_path / "out" / "comparison.png").exists()  # one group: nothing to compare
    rows = parse_table(table)["sweep"]
    np.testing.assert_allclose(rows["reach"], [(0.7 + 1.0) / 2, se([0.7, 1.0]), (0.7 + 1.0) / 2, se([0.7, 1.0])],
                               atol=6e-5)
    assert "2 runs, 1 without eval rows" in table and "last eval step 2000..5000" in table


def test_runs_without_hydra_config_are_their_own_groups(tmp_path):
    s = np.full((2, 3), 0.5)
    write_run(tmp_path / "a", None, s, s)
    write_run(tmp_path / "b", None, s * 0, s)
    table, groups, _ = report.make_report(tmp_path, tmp_path / "out")
    assert [g.label for g in groups] == ["a", "b"]
    rows = parse_table(table)
    assert rows["a"]["overall"] == (0.5, 0.5) and rows["b"]["overall"] == (0.0, 0.0)  # single run: no s.e.
    # a single run directory works as PATH too
    table, groups, _ = report.make_report(tmp_path / "a", tmp_path / "out2")
    assert [g.label for g in groups] == ["a"]


def test_cli_and_errors(sweep, tmp_path):
    root, _ = sweep
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mtrl_hpc.report", str(root), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "agent.name=pcgrad" in proc.stdout and (tmp_path / "o" / "comparison.png").exists()
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "mtrl_hpc.report", str(tmp_path / "empty")], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2 and "no metrics.h5 found below" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(report.ReportError, match="does not exist"):
        report.make_report(tmp_path / "missing")
