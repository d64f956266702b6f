"""`python -m mtrl_hpc.main [-m] [group=option ...] [key=value ...]`: one training run per Hydra job."""

import logging
import pathlib
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtrl_hpc.config_dir import config_dir

log = logging.getLogger("mtrl_hpc")

# Exit status of a run that stopped on a scheduler's signal after writing its checkpoint.
EXIT_STOPPED = 3
# Exit status of a run whose training diverged (mtrl_hpc.divergence): never requeued.
EXIT_DIVERGED = 4


def run(cfg: DictConfig, run_dir: pathlib.Path, ignore_late_warnings: bool = False) -> str:
    """Validate, build and train; returns "finished" or "stopped". Raises ConfigError/CheckpointError.

    ignore_late_warnings: once finished, ignore USR1/USR2 for the rest of the process (the command line's
    choice; a process that goes on after the run keeps its own handlers)."""
    from mtrl_hpc.config_checks import validate
    from mtrl_hpc.experiment import Experiment
    from mtrl_hpc.preemption import StopRequest

    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = StopRequest().install()
    experiment = Experiment(cfg, run_dir, stop)
    start_step = experiment.step
    try:
        outcome = experiment.run()
    finally:
        experiment.close()
    if outcome == "stopped":
        stop.after_stop(made_progress=experiment.step > start_step)
    else:
        stop.uninstall(ignore_warnings=ignore_late_warnings)
    return outcome


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    from mtrl_hpc.checkpoint import CheckpointError
    from mtrl_hpc.config_checks import ConfigError
    from mtrl_hpc.divergence import Diverged
    from mtrl_hpc.metrics import MetricsError

    run_dir = pathlib.Path(cfg.setup.save_dir or HydraConfig.get().runtime.output_dir)
    try:
        outcome = run(cfg, run_dir, ignore_late_warnings=True)
    except (ConfigError, CheckpointError, MetricsError) as error:
        print(f"mtrl_hpc: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Diverged as error:
        print(f"mtrl_hpc: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    except KeyboardInterrupt:
        where = f"setup.save_dir={run_dir}" if cfg.setup.save_dir else f"hydra.run.dir={run_dir}"
        print(f"\nmtrl_hpc: interrupted. To continue from the newest checkpoint: python -m mtrl_hpc.main "
              f"<same overrides> {where}", file=sys.stderr, flush=True)
        sys.exit(130)
    if outcome == "stopped":
        sys.exit(EXIT_STOPPED)
    log.info("run finished: %s", run_dir)


if __name__ == "__main__":
    main()
