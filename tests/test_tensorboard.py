"""TensorBoard event files of MetricsLog: read back with TensorBoard's own readers (tags, steps, values), file
mode, resume without a step shown twice (fresh and live readers, and raw records), a killed writer's partial
record, and the one-line error without the package."""

import os
import pathlib
import stat
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # noqa: E402

from mtrl_hpc.metrics import MetricsError, MetricsLog, read_log  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = ["reach-v3", "push-v3", "pick-place-v3"]
KEYS = dict(train_keys=["episode", "critic_loss", "alpha_value", "success"], eval_keys=["episode", "success"],
            train_task_keys=["critic_loss"], eval_task_keys=["success"], console=False)


def scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard's Python reader shows the run."""
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_points(run_dir) -> Counter:
    """(tag, step) -> how often it occurs in all event files: what a reader that never purges shows."""
    out = Counter()
    for path in sorted(pathlib.Path(run_dir).iterdir()):
        if "tfevents" in path.name:
            for event in LegacyEventFileLoader(str(path)).Load():
                for v in event.summary.value:
                    out[(v.tag, event.step)] += 1
    return out


def log_rows(log, steps, rng, expected, eval_every=300):
    """Logs a train row at each step (and an eval row at multiples of eval_every); records them in expected."""
    for step in steps:
        critic = rng.normal(size=len(TASKS))
        row = {"episode": step // 100, "critic_loss": critic.mean(), "alpha_value": rng.uniform()}
        log.log("train", step, row, {"critic_loss": critic})
        expected["train"][step] = {**row, **{f"critic_loss/{t}": c for t, c in zip(TASKS, critic)}}
        if step % eval_every == 0:
            success = rng.integers(0, 11, size=len(TASKS)) / 10
            log.log("eval", step, {"success": success.mean()}, {"success": success})
            expected["eval"][step] = {"success": success.mean(), **{f"success/{t}": s for t, s in zip(TASKS, success)}}


def expected_points(expected) -> dict:
    """{tag: [(step, float32 value)]} from the rows logged (TensorBoard stores scalars as float32)."""
    out = {}
    for kind, rows in expected.items():
        for step in sorted(rows):
            for key, value in rows[step].items():
                out.setdefault(f"{kind}/{key}", []).append((step, float(np.float32(value))))
    return out


def test_event_files_hold_the_logged_rows(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    expected = {"train": {}, "eval": {}}
    old = os.umask(0)
    try:
        log = MetricsLog(run / "metrics.h5", TASKS, tensorboard=True, **KEYS)
    finally:
        os.umask(old)
    with log:
        log_rows(log, range(100, 700, 100), rng, expected)
        log.log("train", 700, {"success": float("nan")})  # a value given as NaN is written as NaN
    got = scalars(run)
    want = expected_points(expected)
    # only what rows gave: no NaN points for keys a row left out ("success" is absent from the other rows)
    assert set(got) == set(want) | {"train/success"}
    assert "eval/success/pick-place-v3" in got and "train/critic_loss/reach-v3" in got
    for tag, points in want.items():
        assert got[tag] == points, tag
    assert len(got["train/success"]) == 1 and got["train/success"][0][0] == 700
    assert np.isnan(got["train/success"][0][1])
    # the same numbers as metrics.h5
    h5 = read_log(run / "metrics.h5")
    np.testing.assert_allclose([v for _, v in got["eval/success/push-v3"]], h5["eval"]["success_env_index_"][:, 1],
                               rtol=1e-6)
    files = [p for p in run.iterdir() if "tfevents" in p.name]
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o644
    # a second fresh log would add a second curve to the same TensorBoard run
    (run / "metrics.h5").unlink()
    with pytest.raises(MetricsError, match="already holds TensorBoard event files"):
        MetricsLog(run / "metrics.h5", TASKS, tensorboard=True, **KEYS)


def test_resume_shows_every_step_once(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(1)
    expected = {"train": {}, "eval": {}}
    with MetricsLog(run / "metrics.h5", TASKS, tensorboard=True, **KEYS) as log:
        log_rows(log, range(100, 1100, 100), rng, expected)
    live = event_accumulator.EventAccumulator(str(run), size_guidance={event_accumulator.SCALARS: 0})
    live.Reload()  # a TensorBoard already watching the run
    assert [e.step for e in live.Scalars("train/episode")] == list(range(100, 1100, 100))

    # preempted at step 1000, the newest checkpoint is at step 600: its rows after 600 come again, other values
    expected = {kind: {s: row for s, row in rows.items() if s <= 600} for kind, rows in expected.items()}
    with MetricsLog.resume(run / "metrics.h5", TASKS, tensorboard=True, last_step=600, **KEYS) as log:
        log_rows(log, range(700, 1300, 100), rng, expected)
    want = expected_points(expected)
    assert [s for s, _ in want["train/episode"]] == list(range(100, 1300, 100))
    assert [s for s, _ in want["eval/success"]] == [300, 600, 900, 1200]

    assert scalars(run) == want  # a reader opened now
    live.Reload()  # the watching reader purges at the new file's SessionLog.START
    assert {tag: [(e.step, e.value) for e in live.Scalars(tag)] for tag in want} == want
    # every (tag, step) once in the files themselves: readers that ignore purge markers show no duplicate either
    points = raw_points(run)
    assert max(points.values()) == 1
    assert sorted(s for tag, s in points if tag == "eval/success/reach-v3") == [300, 600, 900, 1200]
    files = sorted(p for p in run.iterdir() if "tfevents" in p.name)
    assert len(files) == 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]

    # a resume with no checkpoint (last_step=-1) starts the curves over
    with MetricsLog.resume(run / "metrics.h5", TASKS, tensorboard=True, last_step=-1, **KEYS) as log:
        log.log("eval", 0, {"success": 0.25})
    assert scalars(run) == {"eval/success": [(0, 0.25)]}
    assert read_log(run / "metrics.h5")["eval"]["step"].tolist() == [0]


def test_resume_removes_the_temporary_files_of_a_killed_writer(tmp_path):
    run = tmp_path / "run"
    with MetricsLog(run / "metrics.h5", TASKS, tensorboard=True, **KEYS) as log:
        log_rows(log, range(100, 400, 100), np.random.default_rng(3), {"train": {}, "eval": {}})
    stale = [run / ".tmp-123-0a1b2c3d-metrics.h5", run / ".tmp-123-0a1b2c3d-events.out.tb.1700000000.node.123"]
    kept = [run / ".tmp-123-0a1b2c3d-notes.txt", run / "notes.txt"]  # not the log's: left alone
    for p in stale + kept:
        p.write_bytes(b"partial")
    with MetricsLog.resume(run / "metrics.h5", TASKS, tensorboard=True, last_step=200, **KEYS):
        pass
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert read_log(run / "metrics.h5")["train"]["step"].tolist() == [100, 200]


def test_resume_after_a_partial_record(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(2)
    expected = {"train": {}, "eval": {}}
    with MetricsLog(run / "metrics.h5", TASKS, tensorboard=True, **KEYS) as log:
        log_rows(log, range(100, 600, 100), rng, expected)
    (path,) = [p for p in run.iterdir() if "tfevents" in p.name]
    with open(path, "r+b") as fh:  # a writer killed in the middle of its last record
        fh.truncate(path.stat().st_size - 7)
    del expected["train"][500]
    with MetricsLog.resume(run / "metrics.h5", TASKS, tensorboard=True, last_step=10**9, **KEYS) as log:
        log.log("train", 600, {"episode": 6})
    expected["train"][600] = {"episode": 6}
    got = scalars(run)
    assert got["train/episode"] == [(s, s // 100) for s in (100, 200, 300, 400, 600)]
    assert got == expected_points(expected)


NO_TENSORBOARD = textwrap.dedent("""
    import pathlib, sys
    sys.modules["tensorboard"] = None  # as if not installed
    from mtrl_hpc.metrics import MetricsError, MetricsLog
    path = pathlib.Path(sys.argv[1]) / "metrics.h5"
    for open_log in (lambda: MetricsLog(path, ["a"], tensorboard=True),
                     lambda: MetricsLog.resume(path, ["a"], last_step=0, tensorboard=True)):
        try:
            open_log()
        except MetricsError as e:
            print(e)
    print(path.exists())
    MetricsLog(path, ["a"], console=False).close()  # without the option nothing needs it
""")


def test_missing_package_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_TENSORBOARD, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    line = "logger.tensorboard=true needs the tensorboard package: pip install 'mtrl_hpc[tensorboard]'"
    assert proc.stdout.splitlines() == [line, line, "False"]
    assert (tmp_path / "metrics.h5").exists()
