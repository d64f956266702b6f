"""Test session settings shared by every test module."""

import os
import sys

import pytest
import torch

# Tests run beside other processes (SLURM daemons, subprocess runs); one torch thread per process avoids
# OpenMP spin-waiting against them. Child processes inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# Test modules import shared helpers from this directory (tests/ is not a package).
sys.path.insert(0, os.path.dirname(__file__))

# The one-node SLURM test cluster (slurm/cluster.sh), one per session, for tests marked `slurm`.
from slurm_fixtures import make_slurm_cluster_fixture  # noqa: E402

slurm_cluster = make_slurm_cluster_fixture()


# tryfirst: xdist reads the marks in its own hook of this name (it appends "@group" to each test id).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Keep tests that share expensive state on one pytest-xdist worker (`--dist loadgroup`).

    The SLURM tests share one session-scoped cluster (started once, stopped by the worker that started it);
    a module with a module-scoped fixture (a trained run, built environments) would build it once per worker
    it is spread over. Without xdist the marks do nothing.
    """
    for item in items:
        defs = item._fixtureinfo.name2fixturedefs  # fixture name -> its definitions, the one in effect last
        if "slurm_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif any(defs[name][-1].scope == "module" for name in item.fixturenames if name in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
