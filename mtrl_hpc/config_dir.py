"""Where the Hydra config tree (the repository's top-level config/) lives on this install."""

import importlib.resources
import pathlib

from omegaconf import OmegaConf


def _first_set(*values):
    """${first_set:a,b,...}: the first value that is not null (config/config.yaml: the run directory)."""
    return next((v for v in values if v is not None), None)


def _not(value):
    """${not:x}: the negation of a boolean (config/agent/components/critic.yaml: layer norm unless routed)."""
    if not isinstance(value, bool):
        raise ValueError(f"${{not:...}} needs true or false, got {value!r}")
    return not value


# The config tree uses them: registered by the module every composer of the tree imports.
OmegaConf.register_new_resolver("first_set", _first_set, replace=True)
OmegaConf.register_new_resolver("not", _not, replace=True)


def config_dir() -> str:
    """Absolute path of the config tree, for editable and regular installs alike."""
    # Regular installs ship config/ as the package mtrl_hpc.config; editable installs map it to the
    # repository's config/, and a plain checkout on sys.path has it beside the package.
    try:
        path = pathlib.Path(str(importlib.resources.files("mtrl_hpc.config")))
        if (path / "config.yaml").is_file():
            return str(path)
    except ModuleNotFoundError:
        pass
    path = pathlib.Path(__file__).resolve().parent.parent / "config"
    if (path / "config.yaml").is_file():
        return str(path)
    raise FileNotFoundError(
        "mtrl_hpc cannot find its config tree (config/config.yaml). Reinstall with "
        "`pip install --no-build-isolation .` from the repository root."
    )
