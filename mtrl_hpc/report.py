"""Tables and plots from the HDF5 metric logs of one run or a whole sweep.

    python -m mtrl_hpc.report PATH [--out DIR] [--ignore KEY ...]

PATH is a run directory, a Hydra multirun sweep directory, or anything above them: every ``metrics.h5``
below it is read (with SWMR, so runs still writing are fine). Runs whose directory holds a
``.hydra/config.yaml`` are grouped by that config minus the ``--ignore`` keys (default: ``setup.seed``), so
the runs of a group are seeds of one configuration; a run without a Hydra config is a group of its own.

Printed (and written to ``DIR/report.txt``): per group, the final and the best eval success of every task and
overall, as mean and standard error across the group's runs. "Final" is a run's last eval row; "best" the
maximum over its eval rows after step 0 (the untrained policy's evaluation is not a result; per task for the
task rows; for "overall", the maximum of the per-row mean over tasks). Overall success of a row is its
``success`` metric, or the mean of its per-task success when that is missing. Plots (``DIR/<group>.png`` and ``DIR/comparison.png``): eval success and episode reward against
steps, mean with a band of one standard error, over the runs holding that step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mtrl_hpc.metrics import MetricsError, read_log

DEFAULT_IGNORE = ("setup.seed",)
FILE_MODE = 0o644


class ReportError(Exception):
    """The report cannot be made; the message says why and what to do."""


@dataclass
class Run:
    path: pathlib.Path
    config: dict | None
    task_names: list[str]
    steps: np.ndarray  # [N] eval steps
    success: np.ndarray  # [N, T] per task (NaN when not logged)
    overall_success: np.ndarray  # [N]
    reward: np.ndarray  # [N] overall episode reward


@dataclass
class Group:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)


# ============================================================================================ loading


def find_logs(path) -> list[pathlib.Path]:
    path = pathlib.Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist")
    if path.is_file():
        if path.name.endswith(".h5"):
            return [path]
        raise ReportError(f"{path} is a file, not a run or sweep directory (nor a metrics.h5)")
    logs = sorted(p for p in path.rglob("metrics.h5") if p.is_file())
    if not logs:
        raise ReportError(f"no metrics.h5 found below {path}; pass a run directory or a sweep directory "
                          "(the one holding the numbered job directories)")
    return logs


def _flatten(cfg, prefix="") -> dict:
    out = {}
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = cfg
    return out


def _load_config(run_dir: pathlib.Path) -> dict | None:
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        return None
    import yaml

    try:
        with open(cfg_path) as fh:
            cfg = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as e:
        raise ReportError(f"cannot read {cfg_path}: {e}") from None
    return cfg if isinstance(cfg, dict) else None


def _overall(per_task: np.ndarray | None, scalar: np.ndarray | None, n: int) -> np.ndarray:
    out = np.full(n, np.nan) if scalar is None else scalar.astype(np.float64).copy()
    if per_task is not None and per_task.shape[1]:
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(per_task, axis=1)
        out = np.where(np.isnan(out), mean, out)
    return out


def load_run(log_path: pathlib.Path) -> Run:
    try:
        data = read_log(log_path)
    except MetricsError as e:
        raise ReportError(str(e)) from None
    ev = data["eval"]
    n, T = len(ev["step"]), len(data["task_names"])
    per_task = ev.get("success_env_index_")
    success = per_task if per_task is not None else np.full((n, T), np.nan)
    reward_tasks = ev.get("episode_reward_env_index_")
    return Run(path=log_path.parent, config=_load_config(log_path.parent), task_names=data["task_names"],
               steps=ev["step"].astype(np.int64), success=success.astype(np.float64),
               overall_success=_overall(per_task, ev.get("success"), n),
               reward=_overall(reward_tasks, ev.get("episode_reward"), n))


def group_runs(runs: Sequence[Run], root: pathlib.Path, ignore: Sequence[str] = DEFAULT_IGNORE) -> list[Group]:
    groups: dict[str, Group] = {}
    flat_by_key: dict[str, dict] = {}
    for run in runs:
        if run.config is None:
            key = "run:" + str(run.path)
            flat = None
        else:
            flat = {k: v for k, v in _flatten(run.config).items() if k not in ignore}
            key = "cfg:" + json.dumps(flat, sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Group(key=key, label="")
            flat_by_key[key] = flat
        groups[key].runs.append(run)
    configs = [f for f in flat_by_key.values() if f is not None]
    all_keys = set().union(*configs) if configs else set()
    varying = sorted(k for k in all_keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1)
    for key, g in groups.items():
        flat = flat_by_key[key]
        if flat is not None and varying:
            g.label = ", ".join(f"{k}={flat.get(k)}" for k in varying)
        elif flat is not None:  # the only configuration below root
            g.label = root.resolve().name
        else:
            rel = os.path.relpath(g.runs[0].path.resolve(), root.resolve())
            g.label = root.resolve().name if rel == "." else rel
        names = {tuple(r.task_names) for r in g.runs}
        if len(names) > 1:
            raise ReportError(f"the runs of group {g.label!r} log different task sets: {sorted(names)}")
    return sorted(groups.values(), key=lambda g: g.label)


# ============================================================================================ numbers


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; se is NaN for one value."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


def _nanmax(a, axis=None):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(a, axis=axis)


def summarize(group: Group) -> dict:
    """{"tasks": {name: {"final": (mean, se), "best": (mean, se)}}, "overall": {...}, "runs": n, "steps": [...]}."""
    runs = [r for r in group.runs if len(r.steps)]
    names = group.runs[0].task_names
    out = {"runs": len(runs), "pending": len(group.runs) - len(runs), "tasks": {},
           "last_steps": [int(r.steps[-1]) for r in runs]}
    for t, name in enumerate(names):
        out["tasks"][name] = {
            "final": mean_se([r.success[-1, t] for r in runs]),
            "best": mean_se([_nanmax(r.success[r.steps > 0, t]) for r in runs]),
        }
    out["overall"] = {
        "final": mean_se([r.overall_success[-1] for r in runs]),
        "best": mean_se([_nanmax(r.overall_success[r.steps > 0]) for r in runs]),
    }
    return out


def curve(runs: Sequence[Run], attr: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, se) of ``attr`` over the runs holding each step."""
    steps = np.unique(np.concatenate([r.steps for r in runs])) if runs else np.zeros(0, np.int64)
    mean, se = np.full(len(steps), np.nan), np.full(len(steps), np.nan)
    for i, s in enumerate(steps):
        vals = [getattr(r, attr)[np.flatnonzero(r.steps == s)[-1]] for r in runs if (r.steps == s).any()]
        mean[i], se[i] = mean_se(vals)
    return steps, mean, se


# ============================================================================================ output


def _fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    return f"{m:.4f}" + (f" ± {s:.4f}" if not math.isnan(s) else "        ")


def format_table(groups: Sequence[Group]) -> str:
    lines = []
    for g in groups:
        summary = summarize(g)
        steps = summary["last_steps"]
        if steps:
            span = f"last eval step {min(steps)}" + (f"..{max(steps)}" if max(steps) != min(steps) else "")
        else:
            span = "no eval rows yet"
        lines.append(f"== {g.label}  ({summary['runs']} run{'s' if summary['runs'] != 1 else ''}"
                     + (f", {summary['pending']} without eval rows" if summary["pending"] else "") + f"; {span})")
        width = max([len("overall"), *(len(n) for n in summary["tasks"])])
        lines.append(f"{'task':<{width}}  {'final success (mean ± s.e.)':<28}  best success (mean ± s.e.)")
        for name, v in [*summary["tasks"].items(), ("overall", summary["overall"])]:
            lines.append(f"{name:<{width}}  {_fmt(v['final']):<28}  {_fmt(v['best'])}")
        lines.append("")
    return "\n".join(lines)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_")[:120] or "run"


def plot(groups: Sequence[Group], out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def draw(ax, runs, attr, label):
        steps, mean, se = curve(runs, attr)
        if not len(steps):
            return
        (line,) = ax.plot(steps, mean, label=label)
        band = np.nan_to_num(se)
        ax.fill_between(steps, mean - band, mean + band, color=line.get_color(), alpha=0.25, linewidth=0)

    panels = (("overall_success", "eval success"), ("reward", "eval episode reward"))
    targets = [(_slug(g.label) + ".png", [g]) for g in groups] + [("comparison.png", list(groups))]
    for name, gs in targets:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        for ax, (attr, title) in zip(axes, panels):
            for g in gs:
                draw(ax, [r for r in g.runs if len(r.steps)], attr, f"{g.label} (n={len(g.runs)})")
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].set_ylim(-0.02, 1.02)
        if any(ax.get_legend_handles_labels()[0] for ax in axes):
            axes[0].legend(fontsize=8, loc="best")
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        os.chmod(path, FILE_MODE)
        written.append(path)
    return written


def make_report(path, out_dir=None,
                ignore: Sequence[str] = DEFAULT_IGNORE) -> tuple[str, list[Group], list[pathlib.Path]]:
    """Reads every log below ``path``, writes report.txt and the plots; returns (table, groups, files)."""
    root = pathlib.Path(path)
    logs = find_logs(root)
    if root.is_file():
        root = root.parent
    runs = [load_run(p) for p in logs]
    groups = group_runs(runs, root, ignore)
    table = format_table(groups)
    out = pathlib.Path(out_dir) if out_dir is not None else root / "report"
    try:
        if not out.exists():
            out.mkdir(parents=True)
            os.chmod(out, 0o755)
        text_path = out / "report.txt"
        text_path.write_text(table)
        os.chmod(text_path, FILE_MODE)
        pngs = plot(groups, out)
    except OSError as e:
        raise ReportError(
            f"cannot write the report into {out} ({e}); pass --out DIR with a writable directory") from None
    return table, groups, [text_path, *pngs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtrl_hpc.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory, a sweep directory, or a metrics.h5 file")
    parser.add_argument("--out", help="where to write report.txt and the plots (default: PATH/report)")
    parser.add_argument("--ignore", action="append", metavar="KEY",
                        help="config key (dotted) that does not define a group; repeatable "
                             f"(default: {', '.join(DEFAULT_IGNORE)})")
    args = parser.parse_args(argv)
    try:
        table, _, files = make_report(args.path, args.out, tuple(args.ignore) if args.ignore else DEFAULT_IGNORE)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"written: {', '.join(str(f) for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
