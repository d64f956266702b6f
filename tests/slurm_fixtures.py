"""A session-scoped pytest fixture that runs a real one-node SLURM cluster through slurm/cluster.sh.

Register it once in conftest.py (tests/ is on sys.path when pytest collects it):

    from slurm_fixtures import make_slurm_cluster_fixture
    slurm_cluster = make_slurm_cluster_fixture()

Tests that request `slurm_cluster` get a `SlurmCluster` and can submit with submitit or sbatch: the fixture
exports SLURM_CONF for the whole session. The cluster is skipped (pytest.skip) where it cannot run here: not
Linux, not root, or SLURM missing without apt-get to install it; with the CI environment variable set, those
cases fail instead. A cluster that was already running before the session is reused and left running.
Under pytest-xdist each worker is a session of its own: tests/conftest.py keeps every test that uses the
fixture on one worker, so one cluster starts.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "cluster.sh"
DEFAULT_STATE_DIR = "/tmp/mtrl-hpc-slurm"
SLURM_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "munged", "mariadbd")


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """How to reach the test cluster."""

    state_dir: Path
    slurm_conf: Path
    partition: str
    node: str
    cpus: int
    start_seconds: float  # wall time of `cluster.sh start` (0 when reused)
    started_here: bool

    @property
    def env(self) -> dict:
        """Environment for subprocesses that call SLURM commands."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command (scontrol, squeue, sacct...) against this cluster; return stdout."""
        out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for f in sorted((self.state_dir / "log").glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {f}\n" + "\n".join(text))
        return "\n".join(parts)


def why_slurm_cannot_run() -> Optional[str]:
    """A reason this machine cannot host the test cluster, or None when it can."""
    if platform.system() != "Linux":
        return f"SLURM test cluster needs Linux (this is {platform.system()})"
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (daemons run as SlurmUser=root); run the slurm tests as root"
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing and shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get to install it"
    if not CLUSTER_SH.exists():
        return f"{CLUSTER_SH} not found"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so this is an error: {reason}", pytrace=False)
    pytest.skip(reason)


def _cluster_sh(cmd: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), cmd, str(state_dir)], capture_output=True, text=True, timeout=timeout
    )


def make_slurm_cluster_fixture(
    state_dir: Optional[str] = None, name: str = "slurm_cluster", start_timeout: float = 600
) -> Callable[..., Iterator[SlurmCluster]]:
    """Build a session-scoped fixture named `name` that yields a running `SlurmCluster`.

    state_dir defaults to $MTRL_SLURM_STATE_DIR or /tmp/mtrl-hpc-slurm. start_timeout covers a first
    start that installs the Debian packages.
    """

    @pytest.fixture(scope="session", name=name)
    def _slurm_cluster() -> Iterator[SlurmCluster]:
        reason = why_slurm_cannot_run()
        if reason:
            _skip_or_fail(reason)
        sd = Path(state_dir or os.environ.get("MTRL_SLURM_STATE_DIR") or DEFAULT_STATE_DIR)
        already_up = _cluster_sh("status", sd, timeout=60).returncode == 0
        t0 = time.monotonic()
        started = _cluster_sh("start", sd, timeout=start_timeout)
        seconds = 0.0 if already_up else time.monotonic() - t0
        if started.returncode != 0:
            logs = "\n".join(
                f"== {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:])
                for f in sorted((sd / "log").glob("*.log"))
            )
            pytest.fail(
                f"slurm/cluster.sh start failed ({started.returncode}):\n{started.stderr}\n{logs}", pytrace=False
            )
        conf = sd / "etc" / "slurm.conf"
        node = platform.node().split(".")[0]
        cpus = int(os.environ.get("MTRL_SLURM_CPUS", "4"))
        cluster = SlurmCluster(sd.resolve(), conf.resolve(), "debug", node, cpus, seconds, not already_up)
        mp = pytest.MonkeyPatch()
        mp.setenv("SLURM_CONF", str(cluster.slurm_conf))
        try:
            yield cluster
        finally:
            mp.undo()
            if cluster.started_here:
                stopped = _cluster_sh("stop", sd, timeout=120)
                if stopped.returncode != 0:
                    print(f"slurm/cluster.sh stop failed: {stopped.stderr}")

    return _slurm_cluster


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.25):
    """Poll `predicate` until it returns something truthy (returned); fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)
        time.sleep(interval)
