"""Videos of evaluation episodes: headless MuJoCo rendering and one MP4 per task.

Rendering needs an OpenGL backend without a display, chosen by MUJOCO_GL: ``osmesa`` (software, any CPU
machine; Debian package ``libosmesa6``) or ``egl`` (GPU nodes; the NVIDIA driver's EGL library). With
MUJOCO_GL unset, ``egl`` is used where torch sees a CUDA device and ``osmesa`` elsewhere. MP4s are written with
PyAV (``pip install mtrl_hpc[video]``), H.264 in yuv420p, at the env's real-time frame rate.

``evaluate_and_record(env, act_fn, num_episodes, out_dir)`` runs the env's evaluation protocol unchanged and
writes ``out_dir/<task>.mp4``: the first ``episodes_to_record`` episodes of each task, one frame after each reset
and after each step. Every file appears complete or not at all (written to a temporary name, then renamed).
"""

from __future__ import annotations

import contextlib
import fractions
import os
import pathlib

import numpy as np

from mtrl_hpc import files
from mtrl_hpc.config_checks import ConfigError

BACKENDS = ("osmesa", "egl")  # headless only: glfw needs a display
DEFAULT_SIZE = 256  # pixels, square; a multiple of 16 (the H.264 macroblock), and about 0.2 s a frame on OSMesa
# Default view (a free camera): the table from the front right, gripper, objects and goals in frame.
DEFAULT_VIEW = {"lookat": (0.0, 0.65, 0.1), "distance": 1.6, "azimuth": 150.0, "elevation": -30.0}
INSTALL_HINT = ("on CPU machines install OSMesa (Debian/Ubuntu: apt-get install libosmesa6) and set MUJOCO_GL=osmesa; "
                "on GPU nodes set MUJOCO_GL=egl")


class RenderError(ConfigError):
    """Videos were asked for but cannot be rendered or written here; the message says what to install.

    A ConfigError, so a training run with experiment.save_video=true stops with this one line."""


def gl_backend() -> str:
    """The OpenGL backend MuJoCo renders with: MUJOCO_GL if set, else egl with a CUDA device, else osmesa.

    Sets MUJOCO_GL to the choice, so gymnasium's and MuJoCo's own renderers in this process agree with it."""
    backend = os.environ.get("MUJOCO_GL", "").strip().lower()
    if not backend:
        import torch

        backend = "egl" if torch.cuda.is_available() else "osmesa"
        os.environ["MUJOCO_GL"] = backend
    if backend not in BACKENDS:
        raise RenderError(f"MUJOCO_GL={backend!r} is not a headless rendering backend; use one of "
                          f"{', '.join(BACKENDS)} ({INSTALL_HINT})")
    return backend


# System library each backend loads (ctypes names); a missing one is reported by name.
_LIBRARIES = {"osmesa": "OSMesa", "egl": "EGL"}


def import_mujoco():
    """`import mujoco`, which with MUJOCO_GL set loads that backend's library: a failure becomes a RenderError."""
    with _render_failures(f"cannot import MuJoCo with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}"):
        import mujoco
    return mujoco


def check_rendering() -> str:
    """Raises RenderError unless MuJoCo can render offscreen here; returns the backend (see gl_backend)."""
    backend = gl_backend()
    mujoco = import_mujoco()
    model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='0.1'/></worldbody></mujoco>")
    renderer = FrameRenderer(model, mujoco.MjData(model), 16, 16, None, backend)
    try:
        with _render_failures(f"cannot render with MUJOCO_GL={backend}"):
            renderer.render()
    finally:
        renderer.close()
    return backend


def _gl_context(backend: str, width: int, height: int):
    import ctypes.util

    if ctypes.util.find_library(_LIBRARIES[backend]) is None:
        raise RenderError(f"cannot render with MUJOCO_GL={backend}: lib{_LIBRARIES[backend]} is not installed; "
                          f"{INSTALL_HINT}")
    with _render_failures(f"cannot render with MUJOCO_GL={backend}"):
        if backend == "osmesa":
            from mujoco.osmesa import GLContext
        else:
            from mujoco.egl import GLContext
        return GLContext(width, height)


@contextlib.contextmanager
def _render_failures(what: str):
    """Any failure inside becomes a one-line RenderError starting with `what`: importing a backend loads its
    system library and creating a context can fail in the driver (ImportError, OSError, AttributeError,
    RuntimeError, MuJoCo's FatalError), and all of them mean "cannot render here"."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        reason = " ".join(str(e).split()) or type(e).__name__
        raise RenderError(f"{what} ({type(e).__name__}: {reason[:300]}); {INSTALL_HINT}") from None


class FrameRenderer:
    """Offscreen RGB frames of one MuJoCo model/data pair, in its own OpenGL context.

    camera: None for DEFAULT_VIEW, or the name of a camera of the model (MetaWorld's fixed "corner" cameras
    render upside down)."""

    def __init__(self, model, data, width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE, camera: str | None = None,
                 backend: str | None = None):
        import mujoco

        self._mujoco = mujoco
        self._model, self._data = model, data
        self._camera = mujoco.MjvCamera()
        if camera is None:
            self._camera.type = mujoco.mjtCamera.mjCAMERA_FREE
            self._camera.lookat[:] = DEFAULT_VIEW["lookat"]
            self._camera.distance = DEFAULT_VIEW["distance"]
            self._camera.azimuth = DEFAULT_VIEW["azimuth"]
            self._camera.elevation = DEFAULT_VIEW["elevation"]
        else:
            cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
            if cam_id < 0:
                names = [model.camera(i).name for i in range(model.ncam)]
                raise ValueError(f"camera={camera!r} is not a camera of this model; choose one of {', '.join(names)} "
                                 "or none for the default view")
            self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
            self._camera.fixedcamid = cam_id
        # The offscreen framebuffer is sized from the model's visual settings: make it fit the frames.
        vis = model.vis.global_
        vis.offwidth, vis.offheight = max(vis.offwidth, width), max(vis.offheight, height)
        backend = backend or gl_backend()
        self._scene = mujoco.MjvScene(model, maxgeom=10000)
        self._option = mujoco.MjvOption()
        self._gl = _gl_context(backend, width, height)
        try:
            with _render_failures(f"cannot render with MUJOCO_GL={backend}"):
                self._gl.make_current()
                self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
                mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        except RenderError:
            self._gl.free()
            raise
        self._rect = mujoco.MjrRect(0, 0, width, height)
        self._rgb = np.empty((height, width, 3), dtype=np.uint8)

    def render(self) -> np.ndarray:
        """The current state of `data` as [height, width, 3] uint8, top row first."""
        mj = self._mujoco
        self._gl.make_current()
        mj.mjv_updateScene(self._model, self._data, self._option, None, self._camera, mj.mjtCatBit.mjCAT_ALL,
                           self._scene)
        mj.mjr_render(self._rect, self._scene, self._context)
        mj.mjr_readPixels(self._rgb, None, self._rect, self._context)
        return np.flipud(self._rgb).copy()  # OpenGL reads the bottom row first

    def close(self) -> None:
        if self._gl is not None:
            self._gl.make_current()
            self._context.free()
            self._gl.free()
            self._gl = None


class Mp4Writer:
    """Frames ([height, width, 3] uint8) -> an H.264 MP4 that appears at `path` on `close()`."""

    def __init__(self, path, width: int, height: int, fps: float):
        try:
            import av
        except ImportError:
            raise RenderError("writing MP4 videos needs PyAV: pip install 'mtrl_hpc[video]' (or pip install av)"
                              ) from None
        if width % 2 or height % 2:
            raise ValueError(f"H.264 needs even frame sizes, got {width}x{height}")
        self.path = pathlib.Path(path)
        self.frames = 0
        self._av = av
        self._tmp = files.temp_path(self.path)
        try:
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
            self._stream = self._container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1000))
        except Exception as e:  # noqa: BLE001 (PyAV's codec and file errors share no base class)
            self._tmp.unlink(missing_ok=True)
            raise RenderError(f"cannot write {self.path} with PyAV's libx264 encoder ({e})") from None
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": "18"}  # visually lossless; frames of a 256x256 episode stay small

    def write(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if frame.shape != (self._stream.height, self._stream.width, 3):
            raise ValueError(f"frame of shape {frame.shape}, the video is {self._stream.height}x{self._stream.width}x3")
        for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> pathlib.Path:
        try:
            for packet in self._stream.encode(None):  # flush the encoder's delayed frames
                self._container.mux(packet)
            self._container.close()
            files.publish(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()
        self._tmp.unlink(missing_ok=True)


def frame_rate(env) -> float:
    """Frames per second that play an episode in real time: one frame per env step of `env.envs[0].dt` seconds."""
    return 1.0 / float(env.envs[0].dt)


def evaluate_and_record(env, act_fn, num_episodes: int, out_dir, episodes_to_record: int = 1,
                        size: int = DEFAULT_SIZE, camera: str | None = None):
    """`env.evaluate(act_fn, num_episodes)` that also writes `out_dir/<task>.mp4` for every task.

    Each video holds the first `episodes_to_record` episodes of its task back to back, (max_episode_steps + 1)
    frames each. Returns (the EvalResult, the video paths in task order). Raises RenderError where rendering
    is unavailable, before any episode runs."""
    if episodes_to_record < 1:
        raise ValueError(f"episodes_to_record must be >= 1, got {episodes_to_record}")
    backend = gl_backend()
    renderers, writers = [], []
    try:
        for task_env in env.envs:
            renderers.append(FrameRenderer(task_env.model, task_env.data, size, size, camera, backend))
        out_dir = files.make_dirs(out_dir)
        fps = frame_rate(env)
        for name in env.task_names:
            writers.append(Mp4Writer(out_dir / f"{name}.mp4", size, size, fps))

        def on_step(episode: int) -> None:
            if episode < episodes_to_record:
                for renderer, writer in zip(renderers, writers):
                    writer.write(renderer.render())

        result = env.evaluate(act_fn, num_episodes, on_step=on_step)
        paths = []
        while writers:
            paths.append(writers.pop(0).close())
        return result, paths
    finally:
        for writer in writers:
            writer.abort()
        for renderer in renderers:
            renderer.close()
