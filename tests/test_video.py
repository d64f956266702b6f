"""Videos of evaluation episodes: frames against gymnasium's MuJoCo renderer, MP4s decoded by ffmpeg
(imageio-ffmpeg, not the PyAV that writes them), experiment.save_video, the CLI's video=true, one-line errors.

Rendering tests need libOSMesa (Debian: libosmesa6); they skip where it is absent, except in CI, which installs it.
"""

import ctypes.util
import json
import os
import pathlib
import subprocess
import sys

import imageio_ffmpeg
import metaworld
import numpy as np
import pytest

from mtrl_hpc import video
from mtrl_hpc.envs import make_env
from test_train import train

HAVE_OSMESA = ctypes.util.find_library("OSMesa") is not None
needs_osmesa = pytest.mark.skipif(not HAVE_OSMESA,
                                  reason="libOSMesa is not installed (Debian: apt-get install libosmesa6)")
REPO = pathlib.Path(__file__).resolve().parents[1]
MT1 = ["env=metaworld-mt1", "env.task_name=reach-v3"]


def decode(path) -> np.ndarray:
    """All frames of a video file as [frames, height, width, 3] uint8, decoded by the ffmpeg executable."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames)


def test_osmesa_is_installed_in_ci():
    # .ci/run installs libosmesa6: in CI the rendering tests must run, not skip.
    assert HAVE_OSMESA or not os.environ.get("CI"), "libOSMesa is missing: .ci/run must apt-get install libosmesa6"


@pytest.fixture
def osmesa(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")


@needs_osmesa
def test_frames_match_an_independent_renderer_and_the_mp4_decodes_to_them(tmp_path, osmesa, monkeypatch):
    from gymnasium.envs.mujoco.mujoco_rendering import MujocoRenderer

    written = []  # the frames handed to the MP4 encoder, to tell rendering errors from compression

    class KeepFrames(video.Mp4Writer):
        def write(self, frame):
            written.append(np.array(frame))
            super().write(frame)

    monkeypatch.setattr(video, "Mp4Writer", KeepFrames)
    steps, size = 6, 128
    actions = np.random.default_rng(0).uniform(-1, 1, size=(2 * steps, 1, 4)).astype(np.float32)
    calls = iter(actions)
    env = make_env("metaworld-mt1", seed=1, mode="eval", task_name="pick-place-v3", max_episode_steps=steps)
    result, paths = video.evaluate_and_record(env, lambda obs: next(calls), 2, tmp_path / "v", episodes_to_record=2,
                                              size=size)
    env.close()
    assert [p.name for p in paths] == ["pick-place-v3.mp4"]
    assert oct(paths[0].stat().st_mode & 0o777) == oct(0o644)
    assert sorted(os.listdir(tmp_path / "v")) == ["pick-place-v3.mp4"]  # no temporary file left

    # The same two episodes straight from MetaWorld (goals 0 and 1), drawn by gymnasium's renderer from the
    # same free camera: after the reset and after each step.
    bench = metaworld.MT1("pick-place-v3", seed=1)
    ref_env = bench.train_classes["pick-place-v3"]()
    view = {k: np.array(v) if k == "lookat" else v for k, v in video.DEFAULT_VIEW.items()}
    renderer = MujocoRenderer(ref_env.model, ref_env.data, default_cam_config=view, width=size, height=size,
                              camera_id=-1)
    reference = []
    for episode in range(2):
        ref_env.set_task(bench.train_tasks[episode])
        ref_env.reset()
        reference.append(renderer.render("rgb_array").copy())
        for t in range(steps):
            ref_env.step(actions[episode * steps + t, 0])
            reference.append(renderer.render("rgb_array").copy())
    renderer.close()
    ref_env.close()
    reference = np.stack(reference)

    assert reference.std() > 20  # a real scene, not a blank frame
    assert not np.array_equal(reference[0], reference[steps])  # the arm moved: frame order is checked
    np.testing.assert_array_equal(np.stack(written), reference)

    frames = decode(paths[0])
    assert frames.shape == (2 * (steps + 1), size, size, 3)
    error = np.abs(frames.astype(np.float64) - reference).mean(axis=(1, 2, 3))
    # yuv420p halves the colour resolution (about 2 levels per pixel here) and H.264 at crf 18 adds about 1.5.
    assert error.max() < 5.0, error
    assert np.abs(frames[0].astype(np.float64) - reference[0][::-1]).mean() > 8 * error.max()  # upside down: far off


@needs_osmesa
def test_save_video_records_each_evaluation_and_leaves_the_metrics_unchanged(tmp_path, osmesa):
    def evals(run_dir, save_video):
        metrics = train(run_dir, *MT1, "experiment.num_train_steps=20", "experiment.eval_freq=10",
                        "experiment.save.freq=0", f"experiment.save_video={save_video}")
        return {k: v for k, v in metrics.items() if k.startswith("eval/") and k != "eval/duration"}

    with_video = evals(tmp_path / "a", True)
    without = evals(tmp_path / "b", False)
    assert with_video.keys() == without.keys() and "eval/success_env_index_" in with_video
    for key in with_video:
        np.testing.assert_array_equal(with_video[key], without[key], err_msg=key)
    steps = sorted(p.name for p in (tmp_path / "a" / "videos").iterdir())
    assert steps == ["step_000000000000", "step_000000000010", "step_000000000020"]
    for step in steps:
        files = sorted((tmp_path / "a" / "videos" / step).iterdir())
        assert [f.name for f in files] == ["reach-v3.mp4"]
        # One eval episode of 10 steps: the reset frame and one per step.
        assert decode(files[0]).shape == (11, video.DEFAULT_SIZE, video.DEFAULT_SIZE, 3)
    assert not (tmp_path / "b" / "videos").exists()


@needs_osmesa
def test_cli_video_writes_one_mp4_per_task(tmp_path, osmesa):
    run_dir = tmp_path / "run"
    train(run_dir, *MT1, "experiment.num_train_steps=20", "experiment.eval_freq=20")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mtrl_hpc.evaluate", str(run_dir), "episodes=3", "video=true", "video_episodes=2",
           "video_size=64", f"out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "MUJOCO_GL": "osmesa"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.csv", "evaluation.json", "reach-v3.mp4"]
    assert decode(out / "reach-v3.mp4").shape == (2 * 11, 64, 64, 3)
    record = json.loads((out / "evaluation.json").read_text())
    assert record["videos"] == ["reach-v3.mp4"] and record["episodes"] == 3


@needs_osmesa
def test_cli_unknown_camera_is_one_line(tmp_path, osmesa):
    run_dir = tmp_path / "run"
    train(run_dir, *MT1, "experiment.num_train_steps=0")
    status, line = one_line_failure([sys.executable, "-m", "mtrl_hpc.evaluate", str(run_dir), "video=true",
                                     "episodes=1", "camera=nowhere"], MUJOCO_GL="osmesa")
    assert status == 2 and "camera='nowhere' is not a camera of this model; choose one of topview, corner" in line


def one_line_failure(cmd, **env):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **env})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode not in (0, 1) and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    return proc.returncode, lines[0]


@pytest.mark.parametrize("env, expected", [
    ({"MUJOCO_GL": "glfw"}, "MUJOCO_GL='glfw' is not a headless rendering backend"),
    # PyOpenGL bound to another platform: OSMesa cannot load, as where libOSMesa is missing.
    ({"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "egl"}, "cannot import MuJoCo with MUJOCO_GL='osmesa'"),
])
def test_cli_without_rendering_fails_with_one_line(tmp_path, env, expected):
    status, line = one_line_failure([sys.executable, "-m", "mtrl_hpc.evaluate", str(tmp_path), "video=true"], **env)
    assert status == 2 and line.startswith("mtrl_hpc.evaluate: " + expected) and "libosmesa6" in line, line


def test_training_with_save_video_fails_with_one_line_where_rendering_is_unavailable(tmp_path):
    from test_train import TINY

    # MUJOCO_GL unset (osmesa is chosen) but PyOpenGL bound to EGL: rendering fails at the first evaluation.
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    env["PYOPENGL_PLATFORM"] = "egl"
    cmd = [sys.executable, "-m", "mtrl_hpc.main", *TINY, *MT1, "experiment.num_train_steps=10",
           "experiment.save_video=true", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode not in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("mtrl_hpc: cannot render with MUJOCO_GL=osmesa"), proc.stderr
