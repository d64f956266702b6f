"""The run directory: making sure it can be written, finding an earlier run to continue, and the command
that continues a run.

A run directory holds the run's config (.hydra/), checkpoints/, metrics.h5 and main.log; rerunning a command
with the same directory resumes the run from its newest checkpoint.
"""

import pathlib
import shlex
import shutil
import tempfile

from omegaconf import OmegaConf

from mtrl_hpc import config_dir  # noqa: F401  registers the resolvers a saved config may use

# What Hydra writes into a run directory before the run starts.
HYDRA_FILES = (".hydra", "main.log")
# Keys that may differ between a run and the command that continues it.
RESUME_IGNORED_KEYS = ("experiment.resume", "setup.save_dir")
# Override keys that name the run directory (replaced by the directory itself in a resume command).
DIRECTORY_KEYS = ("hydra.run.dir", "setup.save_dir", "experiment.resume")


class RunDirError(Exception):
    """A run directory that cannot be used; the message names the path and says what to do."""


def prepare(path) -> pathlib.Path:
    """Creates the directory (and its parents) and checks that files can be written in it."""
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise RunDirError(f"cannot write the run directory {path}: {reason}; choose a writable place with "
                          "hydra.run.dir=DIR or setup.save_dir=DIR") from None
    return path


def remove_unused(path) -> bool:
    """Removes a run directory that holds nothing but what Hydra wrote at start (a refused run's leftovers).
    Returns True when it was removed; a directory with anything else in it is left as it is."""
    path = pathlib.Path(path)
    if not path.is_dir() or any(entry.name not in HYDRA_FILES for entry in path.iterdir()):
        return False
    for name in HYDRA_FILES:
        entry = path / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()
    path.rmdir()
    return True


def find_latest(parent, config: dict, exclude=None) -> pathlib.Path | None:
    """The newest run directory directly under `parent` whose config equals `config` (RESUME_IGNORED_KEYS
    aside) and that holds a checkpoint; None when there is none. Newest: by its newest checkpoint's time."""
    from mtrl_hpc import checkpoint

    parent = pathlib.Path(parent)
    if not parent.is_dir():
        return None
    wanted = _comparable(config)
    found = []
    for run in parent.iterdir():
        saved = run / ".hydra" / "config.yaml"
        if run == exclude or not saved.is_file():
            continue
        newest = checkpoint.latest_path(run)
        if newest is None:
            continue
        try:
            saved_config = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        except Exception:  # an unreadable or foreign config is simply not a match
            continue
        if _comparable(saved_config) == wanted:
            found.append((newest.stat().st_mtime_ns, run))
    return max(found)[1] if found else None


def resume_command(overrides, run_dir, multirun: bool = False) -> str:
    """The command line that continues this run: the run's own overrides, with its directory pinned."""
    run_dir = pathlib.Path(run_dir).resolve()
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in DIRECTORY_KEYS]
    pin = f"hydra.sweep.dir={run_dir.parent}" if multirun else f"hydra.run.dir={run_dir}"
    words = ["python", "-m", "mtrl_hpc.main", *(["-m"] if multirun else []), *kept, pin]
    return " ".join(shlex.quote(w) for w in words)


def _comparable(config: dict) -> dict:
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key in RESUME_IGNORED_KEYS:
        section, name = key.split(".")
        if isinstance(config.get(section), dict):
            config[section].pop(name, None)
    return config
