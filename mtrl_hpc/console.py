"""What a run tells its user: the start-up banner, readable per-task lines, a plain progress line for logs
without a terminal (SLURM), and a copy of every console line in the run's main.log."""

import datetime
import pathlib
import time

from mtrl_hpc.metrics import echo

LINE_WIDTH = 100
# Above this many tasks the per-task line names only the lowest and highest tasks (metrics.h5 has them all).
LISTED_TASKS = 10
SHOWN_AT_EACH_END = 5


class Console:
    """Prints lines (around an active progress bar) and appends them to the run's main.log."""

    def __init__(self, log_path: pathlib.Path | None):
        self.log_path = log_path

    def echo(self, line: str) -> None:
        echo(line)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")


def banner(run_dir, device: str, threads: int, seed: int, env_name: str, task_names, agent_name: str,
           num_parameters: int, resumed_step: int | None, resume_command: str | None) -> list[str]:
    tasks = ", ".join(task_names)
    if len(tasks) > LINE_WIDTH // 2:
        tasks = f"{task_names[0]}, ..., {task_names[-1]}"
    lines = [
        f"run directory  {run_dir}",
        f"device         {device}, {threads} CPU thread{'s' if threads != 1 else ''}",
        f"seed           {seed}",
        f"env            {env_name}: {len(task_names)} task{'s' if len(task_names) != 1 else ''} ({tasks})",
        f"agent          {agent_name}, {num_parameters:,} parameters",
        f"start          {'fresh' if resumed_step is None else f'resumed from the checkpoint at step {resumed_step}'}",
    ]
    if resume_command:
        lines.append(f"to resume      {resume_command}")
    width = max(len(l) for l in lines)
    rule = "-" * min(width, LINE_WIDTH)
    return [rule, *lines, rule]


def task_lines(label: str, task_names, values, width: int = LINE_WIDTH) -> list[str]:
    """`label` and one `name=value` per task, wrapped to `width`; with many tasks, the lowest and highest only."""
    pairs = list(zip(task_names, (float(v) for v in values)))
    if len(pairs) > LISTED_TASKS:
        ranked = sorted(pairs, key=lambda p: p[1])
        low, high = ranked[:SHOWN_AT_EACH_END], ranked[-SHOWN_AT_EACH_END:][::-1]
        mean = sum(v for _, v in pairs) / len(pairs)
        return [f"  {label} ({len(pairs)} tasks, mean {mean:.2f})",
                "    lowest:  " + ", ".join(f"{n}={v:.2f}" for n, v in low),
                "    highest: " + ", ".join(f"{n}={v:.2f}" for n, v in high)]
    lines, line = [], f"  {label}:"
    for name, value in pairs:
        item = f" {name}={value:.2f}"
        if len(line) + len(item) > width and line.strip() != f"{label}:":
            lines.append(line)
            line = "   "
        line += item
    lines.append(line)
    return lines


class ProgressLine:
    """Every `every` episodes: step, percent, env steps/s and ETA, as one plain line (for logs without a TTY)."""

    def __init__(self, total_steps: int, start_step: int, every: int):
        self.total, self.every = total_steps, every
        self.start_step, self.start_time = start_step, time.monotonic()

    def line(self, step: int, episode: int) -> str | None:
        if self.every <= 0 or episode % self.every or step <= self.start_step:
            return None
        elapsed = time.monotonic() - self.start_time
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        pct = 100.0 * step / self.total if self.total else 100.0
        return (f"progress: step {step}/{self.total} ({pct:.1f}%), {rate:.0f} steps/s, "
                f"elapsed {clock(elapsed)}, ETA {clock(eta)}")


def clock(seconds: float) -> str:
    """h:mm:ss (or "?" for an unknown time)."""
    if seconds == float("inf") or seconds != seconds:
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))
