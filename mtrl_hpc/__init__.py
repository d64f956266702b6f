"""mtrl_hpc: multi-task reinforcement learning for HPC clusters."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_policy"]


def __getattr__(name):
    # Imported on first use: `import mtrl_hpc` stays free of torch and MuJoCo.
    if name == "load_policy":
        from mtrl_hpc.policy import load_policy

        return load_policy
    raise AttributeError(f"module 'mtrl_hpc' has no attribute {name!r}")
