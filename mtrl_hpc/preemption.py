"""Stop requests from the scheduler.

SLURM warns a job before its time limit with the signal asked for in `--signal` (SIGUSR1 in slurm/*.sbatch,
SIGUSR2 from submitit), and sends SIGTERM on `scancel`, preemption and `scontrol requeue`. The handler only
records the request; the training loop checkpoints at its next safe point (an episode boundary) and returns,
and then `after_stop()` decides what happens to the job:

- after a warning signal (USR1/USR2) inside a SLURM job, the run requeues its own job (`scontrol requeue`), as
  long as this allocation made progress. It does not go through submitit's handler, whose timeout budget
  (`max_num_timeout`, 0 in hydra-submitit-launcher's defaults) would end a long run at its first time limit;
  the requeued job runs the same submission again, in the same run directory, and resumes.
- after SIGTERM nothing is requeued: SLURM itself requeues a preempted or `scontrol requeue`d job, and a job
  cancelled with `scancel` must stay cancelled.

Ctrl-C (SIGINT) is a stop request too: the first one stops the run at its next episode boundary, after a
checkpoint; a second one stops it at once (KeyboardInterrupt), keeping the checkpoints already written.

A batch script that requeues the job itself (slurm/train.sbatch, which also serves runs inside Apptainer,
where `scontrol` is absent) sets MTRL_HPC_REQUEUE=0 to turn the run's own requeue off.
"""

import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger(__name__)

WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, *WARNING_SIGNALS, signal.SIGINT)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: `<array job>_<task>` for array jobs (submitit multiruns)."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class StopRequest:
    def __init__(self):
        self.requested = False
        self.reason = ""
        self.signum = None
        self._previous = {}

    def install(self, signals=STOP_SIGNALS) -> "StopRequest":
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self, ignore_warnings: bool = False) -> None:
        """Puts the previous handlers back; with ignore_warnings (the run has finished its work) USR1/USR2 are
        ignored from now on instead: a time-limit warning that comes while the job exits must not fail it
        (submitit's handler would take it for a time-out, and Python's default action kills the process,
        also during interpreter shutdown)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if ignore_warnings and sig in WARNING_SIGNALS else handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            print("\nmtrl_hpc: Ctrl-C: stopping at the next episode boundary, after a checkpoint "
                  "(Ctrl-C again stops now)", file=sys.stderr, flush=True)
        if self.signum == signal.SIGINT:
            return  # after a Ctrl-C the run stops for its user, whatever signal comes next
        self.requested = True
        self.signum = signum
        self.reason = signal.Signals(signum).name

    def after_stop(self, made_progress: bool) -> bool:
        """Called once the checkpoint is written. Returns True when the job was requeued."""
        self.uninstall()
        job = slurm_job_id()
        if job is None or self.signum not in WARNING_SIGNALS or os.environ.get("MTRL_HPC_REQUEUE", "1") == "0":
            return False
        if not made_progress:
            log.error("stopped by %s without progress since the job started: not requeueing job %s", self.reason, job)
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.error("cannot run scontrol to requeue job %s (%s); the job ends here, resubmit it to resume", job, error)
            return False
        if result.returncode != 0:
            log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
            return False
        log.warning("job %s requeued; it resumes from the checkpoint", job)
        return True
