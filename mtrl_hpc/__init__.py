"""mtrl_hpc: multi-task reinforcement learning for HPC clusters."""

__version__ = "0.1.0"
