"""Stop requests from the scheduler: SLURM and submitit signal a job (SIGTERM, SIGUSR1, SIGUSR2) some time
before they kill it. The handler only records the request; the training loop checkpoints at its next
safe point (an episode boundary) and returns, and then `after_stop()` asks for the job to be requeued."""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


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

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum
        self.reason = signal.Signals(signum).name

    def after_stop(self) -> None:
        """Hand the signal to whoever handled it before us (submitit requeues the job there)."""
        previous = self._previous.get(self.signum)
        self.uninstall()
        if callable(previous):
            previous(self.signum, None)
