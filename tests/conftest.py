"""Test session settings shared by every test module."""

import os
import sys

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
