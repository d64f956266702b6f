"""The checks a run passes before it makes anything: the config's keys and types, its values, its directory.

Hydra creates a run's directory and writes .hydra/ into it before it calls the task function, so a single run
is checked in Hydra's `on_run_start` callback (config/config.yaml: hydra.callbacks), where a refused run leaves
nothing behind. Multirun jobs are checked in the task function (mtrl_hpc.main), which removes the job's
directory again when the job is refused.
"""

import logging
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtrl_hpc import run_dir
from mtrl_hpc.config_checks import ConfigError, check_config, resolve_device
from mtrl_hpc.config_schema import check_schema, group_overrides, reference_config
from mtrl_hpc.errors import short_error

log = logging.getLogger(__name__)

# Exit status of a run refused before it started (bad config, unusable paths, unreadable checkpoint).
EXIT_REFUSED = 2


def config_problems(cfg: DictConfig, choices, overrides) -> list[str]:
    """Every problem of cfg, one message each; empty when it can run.

    choices: Hydra's group choices of the run ({"env": "metaworld-mt1", ...}); overrides: its command line."""
    try:
        reference = reference_config(group_overrides(list(overrides), list(choices)))
    except Exception as error:  # e.g. a job process that cannot see the command line's config search path
        log.warning("config keys and types not checked (the config tree cannot be composed here: %s)",
                    short_error(error))
        reference = None
    problems = check_schema(cfg, reference) if reference is not None else []
    if problems:
        return problems  # the value checks assume the right types
    problems = check_config(cfg)
    try:
        resolve_device(cfg.setup.device)
    except ConfigError as error:
        problems.append(str(error))
    return problems


def refuse(problems: list[str]) -> None:
    """Prints the problems, one line each, and exits with EXIT_REFUSED."""
    if len(problems) == 1:
        print(f"mtrl_hpc: {problems[0]}", file=sys.stderr, flush=True)
    else:
        print("mtrl_hpc: invalid config:\n  - " + "\n  - ".join(problems), file=sys.stderr, flush=True)
    sys.exit(EXIT_REFUSED)


class PreRunChecks(Callback):
    """Refuses a bad single run before Hydra creates its directory, and a multirun whose sweep directory
    cannot be written before any job starts."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # (Hydra turns an exception raised here into a warning and goes on: every failure must refuse.)
        problems = config_problems(config, OmegaConf.to_container(config.hydra.runtime.choices),
                                   OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        if problems:
            refuse(problems)
        try:
            run_dir.prepare(config.hydra.run.dir)
        except run_dir.RunDirError as error:
            refuse([str(error)])
        except OmegaConfBaseException as error:
            refuse([f"hydra.run.dir cannot be resolved: {short_error(error)}"])

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            run_dir.prepare(config.hydra.sweep.dir)
        except run_dir.RunDirError as error:
            refuse([str(error).replace("hydra.run.dir", "hydra.sweep.dir")])
