"""HDF5 metric log: layout, NaN for missing metrics, SWMR reading while writing, resume, console, progress bar."""

import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from mtrl_hpc import metrics
from mtrl_hpc.metrics import MetricsError, MetricsLog, ProgressBar, format_line, read_log

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = ["reach-v3", "push-v3", "pick-place-v3"]


def make(path, **kw):
    return MetricsLog(path, TASKS, train_keys=["episode", "duration", "episode_reward", "success", "actor_loss"],
                      eval_keys=["episode_reward", "success"], train_task_keys=["success"],
                      eval_task_keys=["episode_reward", "success"], console=False, **kw)


def test_rows_layout_nan_and_tensors(tmp_path):
    path = tmp_path / "metrics.h5"
    old = os.umask(0)
    try:
        log = make(path)
    finally:
        os.umask(old)
    with log:
        log.log("train", 500, {"episode": 1, "episode_reward": torch.tensor(12.5), "success": np.float32(0.25),
                               "step": 500}, {"success": torch.tensor([0.0, 1.0, 0.0])})
        log.log("train", 1000, {"episode": 2, "actor_loss": torch.tensor(-1.5, dtype=torch.float64)})
        log.log("eval", 1000, {"success": 0.5}, {"success": [1.0, 0.0, 0.5], "episode_reward": np.arange(3)})
        with pytest.raises(MetricsError, match="unknown metrics \\['critic_loss'\\]"):
            log.log("train", 1500, {"critic_loss": 1.0})
        with pytest.raises(MetricsError, match="expected \\(3,\\)"):
            log.log("eval", 1500, per_task={"success": [1.0, 0.0]})
        with pytest.raises(MetricsError, match="expected a scalar"):
            log.log("train", 1500, {"success": torch.ones(2)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    data = read_log(path)
    assert data["task_names"] == TASKS
    tr = data["train"]
    np.testing.assert_array_equal(tr["step"], [500, 1000])
    np.testing.assert_array_equal(tr["episode"], [1, 2])
    np.testing.assert_array_equal(tr["episode_reward"], [12.5, np.nan])
    np.testing.assert_array_equal(tr["actor_loss"], [np.nan, -1.5])
    np.testing.assert_array_equal(tr["success_env_index_"], [[0, 1, 0], [np.nan] * 3])
    assert tr["success_env_index_"].shape == (2, 3) and "step" in tr and len(tr) == 7
    np.testing.assert_array_equal(data["eval"]["episode_reward_env_index_"], [[0, 1, 2]])
    with pytest.raises(MetricsError, match="already exists.*resume"):
        make(path)


READER = textwrap.dedent("""
    import sys, h5py
    f = h5py.File(sys.argv[1], "r", swmr=True)
    ds = f["train/step"]
    print(ds.shape[0], flush=True)
    for line in sys.stdin:
        ds.refresh()
        print(ds.shape[0], ds[-1] if ds.shape[0] else -1, flush=True)
""")


def test_second_process_reads_rows_appended_after_it_opened(tmp_path):
    path = tmp_path / "metrics.h5"
    with make(path) as log:
        log.log("train", 1, {"episode": 1})
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().split() == ["1"]
            for step in (2, 3, 4):
                log.log("train", step, {"episode": step})
                reader.stdin.write("\n")
                reader.stdin.flush()
                assert reader.stdout.readline().split() == [str(step), str(step)]
        finally:
            reader.stdin.close()
            reader.wait(timeout=60)
        # a reader in this process sees the rows too (read_log opens with swmr=True)
        assert read_log(path)["train"]["step"].tolist() == [1, 2, 3, 4]


HOLDER = textwrap.dedent("""
    import sys, time, h5py
    with h5py.File(sys.argv[1], "r"):  # no swmr: HDF5 holds a shared lock while the file is open
        print("open", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold_open(path, seconds):
    """A reader in another process that holds the log open (and locked) for ``seconds``."""
    reader = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert reader.stdout.readline().strip() == "open"
    return reader


def test_appending_waits_for_a_reader_to_release_the_file(tmp_path):
    # A monitoring script that opens the log just before the run switches it to SWMR mode locks it briefly;
    # the run waits instead of ending with "cannot open ... for appending".
    path = tmp_path / "metrics.h5"
    make(path).close()
    reader = hold_open(path, 1.0)
    try:
        with make(path, _append=True) as log:
            log.log("train", 7, {"episode": 1})
    finally:
        reader.kill()
        reader.wait()
    assert read_log(path)["train"]["step"].tolist() == [7]


def test_appending_gives_up_on_a_reader_that_keeps_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.h5"
    make(path).close()
    monkeypatch.setattr(metrics, "LOCK_WAIT_S", 0.5)
    reader = hold_open(path, 60)
    try:
        with pytest.raises(MetricsError, match="for appending .*held it open for 0.5 s \\(a reader that keeps"):
            make(path, _append=True)
    finally:
        reader.kill()
        reader.wait()


SECOND_WRITER = textwrap.dedent("""
    import sys
    from mtrl_hpc.metrics import MetricsError, MetricsLog
    try:
        MetricsLog(sys.argv[1], ["reach-v3", "push-v3", "pick-place-v3"], console=False, _append=True)
    except MetricsError as e:
        print(e)
""")


def test_a_second_writer_is_refused_without_waiting_for_the_lock(tmp_path):
    path = tmp_path / "metrics.h5"
    with make(path) as log:
        log.log("train", 1, {"episode": 1})
        out = subprocess.run([sys.executable, "-c", SECOND_WRITER, str(path)], capture_output=True, text=True,
                             timeout=120, cwd=REPO)
        # HDF5 marks the file as open for SWMR writing: not a lock error, so it is refused at once
        assert "for appending" in out.stdout and "is another run writing it?" in out.stdout, out.stdout + out.stderr
        log.log("train", 2, {"episode": 2})
    assert read_log(path)["train"]["step"].tolist() == [1, 2]


def test_resume_drops_rows_after_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.h5"
    with make(path) as log:
        for step in range(100, 1100, 100):
            log.log("train", step, {"episode": step // 100})
            if step % 300 == 0:
                log.log("eval", step, {"success": step / 1000})
    # the run is preempted at step 1000; its newest checkpoint is at step 600
    with MetricsLog.resume(path, TASKS, train_keys=["episode", "duration", "episode_reward", "success",
                                                    "actor_loss", "critic_loss"],
                           eval_keys=["episode_reward", "success"], train_task_keys=["success"],
                           eval_task_keys=["episode_reward", "success"], last_step=600, console=False) as log:
        for step in range(700, 1300, 100):
            log.log("train", step, {"episode": step // 100, "critic_loss": 1.0})
            if step % 300 == 0:
                log.log("eval", step, {"success": step / 1000})
    data = read_log(path)
    assert data["train"]["step"].tolist() == list(range(100, 1300, 100))  # no duplicate, no gap
    assert data["train"]["episode"].tolist() == list(range(1, 13))
    assert np.isnan(data["train"]["critic_loss"][:6]).all() and (data["train"]["critic_loss"][6:] == 1).all()
    assert data["eval"]["step"].tolist() == [300, 600, 900, 1200]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with pytest.raises(MetricsError, match="logs the tasks"):
        MetricsLog.resume(path, ["other"], last_step=0)
    # resuming a run that never logged creates the log
    MetricsLog.resume(tmp_path / "new.h5", TASKS, last_step=0, console=False).close()


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from mtrl_hpc.metrics import MetricsLog
    log = MetricsLog(sys.argv[1], ["a", "b"], console=False)
    for step in range(1, 51):
        log.log("train", step, {"episode": step}, {"success": [0.0, 1.0]})
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_log_of_a_killed_writer_is_readable_and_resumable(tmp_path):
    path = tmp_path / "metrics.h5"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -signal.SIGKILL
    assert read_log(path)["train"]["step"].tolist() == list(range(1, 51))
    with MetricsLog.resume(path, ["a", "b"], last_step=40, console=False) as log:
        log.log("train", 41, {"episode": 41})
    assert read_log(path)["train"]["step"].tolist() == list(range(1, 42))


def test_console_line_and_progress_bar(tmp_path, capsys):
    line = format_line("train", 1500, {"episode": 3, "duration": 12.07, "episode_reward": 512.34, "success": 0.2,
                                       "critic_loss": float("nan")})
    assert line == "| train | E: 3 | S: 1500 | D: 12.1s | R: 512.3 | Su: 0.2000 |"
    with MetricsLog(tmp_path / "m.h5", TASKS, console=True) as log:
        log.log("eval", 10, {"success": 1.0})
    assert capsys.readouterr().out == "| eval  | S: 10 | Su: 1.0000 |\n"
    bar = ProgressBar(total=100, initial=10)  # stdout is captured, not a TTY: no bar, no output
    assert not bar.enabled
    bar.update(5)
    bar.close()
    assert capsys.readouterr().out == ""
    with ProgressBar(total=100, initial=10, enabled=True) as bar:
        bar.update(5)
        metrics.echo("| train | S: 15 |")
    out = capsys.readouterr().out
    assert "| train | S: 15 |" in out and "15/100" in out


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "metrics.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    with pytest.raises(MetricsError, match="not an mtrl_hpc metric log"):
        read_log(path)
    path.write_bytes(b"garbage")
    with pytest.raises(MetricsError, match="damaged or not an HDF5 file"):
        read_log(path)
