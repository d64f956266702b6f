"""`python -m mtrl_hpc.main [-m] [group=option ...] [key=value ...]`: one training run per Hydra job."""

import logging
import pathlib
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtrl_hpc.config_dir import config_dir

log = logging.getLogger("mtrl_hpc")

# Exit status of a run that stopped on a scheduler's signal after writing its checkpoint.
EXIT_STOPPED = 3
# Exit status of a run whose training diverged (mtrl_hpc.divergence): never requeued.
EXIT_DIVERGED = 4
# Exit status of a run stopped with Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 128 + signal.SIGINT


def run(cfg: DictConfig, run_dir: pathlib.Path, ignore_late_warnings: bool = False,
        resume_command: str | None = None) -> str:
    """Validate, build and train; returns "finished", "stopped" (a scheduler's signal) or "interrupted"
    (Ctrl-C), the last two after a checkpoint. Raises ConfigError/CheckpointError.

    ignore_late_warnings: once finished, ignore USR1/USR2 for the rest of the process (the command line's
    choice; a process that goes on after the run keeps its own handlers). resume_command: shown in the banner."""
    from mtrl_hpc.config_checks import validate
    from mtrl_hpc.experiment import Experiment
    from mtrl_hpc.preemption import StopRequest

    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = StopRequest().install()
    try:
        experiment = Experiment(cfg, run_dir, stop, resume_command)
        start_step = experiment.step
        try:
            outcome = experiment.run()
        finally:
            experiment.close()
    except BaseException:
        stop.uninstall()
        raise
    if outcome == "stopped":
        interrupted = stop.signum == signal.SIGINT
        stop.after_stop(made_progress=experiment.step > start_step)
        return "interrupted" if interrupted else "stopped"
    stop.uninstall(ignore_warnings=ignore_late_warnings)
    return outcome


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    from mtrl_hpc import run_dir as run_dirs
    from mtrl_hpc.checkpoint import CheckpointError
    from mtrl_hpc.config_checks import ConfigError
    from mtrl_hpc.divergence import Diverged
    from mtrl_hpc.metrics import MetricsError
    from mtrl_hpc.prerun import EXIT_REFUSED, config_problems, refuse

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    hydra_dir = pathlib.Path(hydra_cfg.runtime.output_dir)
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    # Single runs were checked before Hydra made their directory (mtrl_hpc.prerun); multirun jobs are checked here.
    if multirun:
        problems = config_problems(cfg, OmegaConf.to_container(hydra_cfg.runtime.choices), overrides)
        if problems:
            run_dirs.remove_unused(hydra_dir)
            refuse(problems)
    try:
        run_dir = _run_dir(cfg, hydra_dir, multirun)
    except run_dirs.RunDirError as error:
        run_dirs.remove_unused(hydra_dir)
        refuse([str(error)])

    try:
        outcome = run(cfg, run_dir, ignore_late_warnings=True,
                      resume_command=run_dirs.resume_command(overrides, run_dir, multirun))
    except (ConfigError, CheckpointError, MetricsError) as error:
        print(f"mtrl_hpc: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
    except Diverged as error:
        print(f"mtrl_hpc: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    except KeyboardInterrupt:
        print(f"\nmtrl_hpc: interrupted. {_resume_hint(overrides, run_dir, multirun)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    if outcome == "interrupted":
        print(f"mtrl_hpc: stopped by Ctrl-C. {_resume_hint(overrides, run_dir, multirun)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    if outcome == "stopped":
        sys.exit(EXIT_STOPPED)
    log.info("run finished: %s", run_dir)


def _run_dir(cfg: DictConfig, hydra_dir: pathlib.Path, multirun: bool) -> pathlib.Path:
    """The directory this run lives in: setup.save_dir, the run experiment.resume names, or Hydra's."""
    from mtrl_hpc import checkpoint
    from mtrl_hpc import run_dir as run_dirs

    run_dir = pathlib.Path(cfg.setup.save_dir) if cfg.setup.save_dir else hydra_dir
    resume = cfg.experiment.resume
    if resume is None:
        return run_dirs.prepare(run_dir)
    if multirun:
        raise run_dirs.RunDirError(
            f"experiment.resume={resume} is for single runs; a multirun continues when its command is run again "
            "with hydra.sweep.dir=<its sweep directory>")
    if resume == "latest":
        found = run_dirs.find_latest(run_dir.parent, OmegaConf.to_container(cfg, resolve=True), exclude=run_dir)
        if found is None:
            log.info("experiment.resume=latest: no earlier run of this config with a checkpoint in %s; "
                     "starting a new run", run_dir.parent)
            return run_dirs.prepare(run_dir)
    else:
        found = pathlib.Path(resume)
        if checkpoint.latest_path(found) is None:
            raise run_dirs.RunDirError(
                f"experiment.resume={resume}: no checkpoint in {found / 'checkpoints'}; name the directory of "
                "an earlier run, or use experiment.resume=latest")
    _move_log_file(hydra_dir, found)
    run_dirs.remove_unused(hydra_dir)
    log.info("continuing the run in %s", found)
    return run_dirs.prepare(found)


def _move_log_file(old_dir: pathlib.Path, new_dir: pathlib.Path) -> None:
    """Points the log file handler Hydra opened in old_dir at new_dir/main.log (appending)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and pathlib.Path(handler.baseFilename).parent == old_dir.resolve():
            moved = logging.FileHandler(new_dir / pathlib.Path(handler.baseFilename).name, mode="a")
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)


def _resume_hint(overrides: list[str], run_dir: pathlib.Path, multirun: bool) -> str:
    from mtrl_hpc import checkpoint
    from mtrl_hpc import run_dir as run_dirs

    newest = checkpoint.latest_path(run_dir)
    command = run_dirs.resume_command(overrides, run_dir, multirun)
    if newest is None:
        return f"No checkpoint was written yet: this command starts the run over in the same directory:\n  {command}"
    return f"To continue from the checkpoint at step {checkpoint.step_of(newest)}:\n  {command}"


if __name__ == "__main__":
    main()
