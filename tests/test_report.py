"""Report: tables checked against an independent numpy computation, plots, grouping, errors."""

import math
import os
import pathlib
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mtrl_hpc import report
from mtrl_hpc.metrics import MetricsLog

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = ["reach", "push", "pick"]
EVAL_STEPS = [0, 1000, 2000, 3000]  # step 0: the untrained policy, not counted as best


def write_run(run_dir, config, success, reward):
    """success: [N, T] per-task eval success; reward: [N, T]."""
    run_dir.mkdir(parents=True)
    if config is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with MetricsLog(run_dir / "metrics.h5", TASKS, console=False) as log:
        for i, step in enumerate(EVAL_STEPS[: len(success)]):
            log.log("train", step, {"episode": i})
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
            write_run(root / str(job), cfg, success, reward)
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


def test_table_matches_numpy(sweep, tmp_path):
    root, data = sweep
    table, groups, files = report.make_report(root, tmp_path / "out")
    parsed = parse_table(table)
    assert set(parsed) == {"agent.name=mtsac", "agent.name=pcgrad"}
    for agent, runs in data.items():
        rows = parsed[f"agent.name={agent}"]
        succ = np.stack([s for s, _ in runs])  # [seeds, N, T]
        for t, name in enumerate(TASKS):
            final, best = succ[:, -1, t], succ[:, 1:, t].max(axis=1)
            np.testing.assert_allclose(rows[name], [final.mean(), se(final), best.mean(), se(best)], atol=6e-5)
        overall = succ.mean(axis=2)  # [seeds, N]
        np.testing.assert_allclose(rows["overall"], [overall[:, -1].mean(), se(overall[:, -1]),
                                                     overall[:, 1:].max(axis=1).mean(), se(overall[:, 1:].max(axis=1))], atol=6e-5)
    names = sorted(p.name for p in files)
    assert names == ["agent.name=mtsac.png", "agent.name=pcgrad.png", "comparison.png", "report.txt"]
    for p in files:
        assert p.stat().st_size > 0 and stat.S_IMODE(p.stat().st_mode) == 0o644
    assert (tmp_path / "out" / "report.txt").read_text() == table
    # the curves are the per-step mean and s.e. across seeds
    steps, mean, err = report.curve(groups[0].runs, "overall_success")
    succ = np.stack([s for s, _ in data["mtsac"]]).mean(axis=2)
    np.testing.assert_array_equal(steps, EVAL_STEPS)
    np.testing.assert_allclose(mean, succ.mean(axis=0))
    np.testing.assert_allclose(err, succ.std(axis=0, ddof=1) / math.sqrt(3))


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
