"""Learning-rate decay of an optimizer: `lr` until update `start`, then linear to `final_lr` at update `end`,
then constant. The rate is a function of the update count alone, so a resumed run recomputes it from its
step and a checkpoint needs no schedule state."""

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearDecay:
    lr: float
    final_lr: float
    start: int
    end: int

    def __call__(self, update: int) -> float:
        if update <= self.start:
            return self.lr
        if update >= self.end:
            return self.final_lr
        return self.lr + (update - self.start) / (self.end - self.start) * (self.final_lr - self.lr)


def make_lr_schedule(optimizer_cfg) -> LinearDecay | None:
    """The optimizer config's `lr_decay` ({final_lr, start, end}) as a schedule; None when final_lr is null."""
    decay = optimizer_cfg.get("lr_decay")
    if decay is None or decay.get("final_lr") is None:
        return None
    return LinearDecay(float(optimizer_cfg["lr"]), float(decay["final_lr"]), int(decay["start"]), int(decay["end"]))
