"""Tables and plots from the HDF5 metric logs of one run or a whole sweep.

    python -m mtrl_hpc.report PATH [--out DIR] [--ignore KEY ...]

PATH is a run directory, a Hydra multirun sweep directory, or anything above them: every ``metrics.h5``
below it is read (with SWMR, so runs still writing are fine). Runs whose directory holds a
``.hydra/config.yaml`` are grouped by that config minus the ``--ignore`` keys (default: ``setup.seed``), so
the runs of a group are seeds of one configuration; a run without a Hydra config is a group of its own.

Printed (and written to ``DIR/report.txt``, and as ``DIR/report.csv`` with full precision and one column per
config key that differs between groups): per group, the final and the best eval success of every task and
overall, as mean and standard error across the group's runs. "Final" is a run's last eval row; "best" the
maximum over its eval rows after step 0 (the untrained policy's evaluation is not a result; per task for the
task rows; for "overall", the maximum of the per-row mean over tasks). Overall success of a row is its
``success`` metric, or the mean of its per-task success when that is missing.

Plots, each curve the mean over the runs holding that step with a band of one standard error:
``DIR/<group>.png`` eval success and return, train success, critic and actor loss, temperature;
``DIR/<group>_tasks.png`` eval success of every task; with two or more groups also ``DIR/comparison.png`` and
``DIR/comparison_tasks.png``, all groups in one figure, labelled by the config keys that differ (shortened).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import re
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mtrl_hpc.files import FILE_MODE
from mtrl_hpc.metrics import MetricsError, read_log

DEFAULT_IGNORE = ("setup.seed",)
TRAIN_CURVES = ("success", "critic_loss", "actor_loss", "alpha_value")
MARKER_MAX = 60  # curves with at most this many points show a marker at each (a single eval row stays visible)
TRAIN_BINS = 100  # train rows (one per episode) beyond this many per run are averaged in bins of steps


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
    train_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [M]
    train: dict = field(default_factory=dict)  # {TRAIN_CURVES key: [M]}, NaN where a row did not log it


@dataclass
class Group:
    key: str
    label: str  # every differing config key with its value (table, CSV, file names)
    runs: list[Run] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # {differing config key: value}
    short: str = ""  # legend label: the differing keys abbreviated


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rows without any per-task value: NaN
            mean = np.nanmean(per_task, axis=1)
        out = np.where(np.isnan(out), mean, out)
    return out


def load_run(log_path: pathlib.Path) -> Run:
    try:
        data = read_log(log_path)
    except MetricsError as e:
        raise ReportError(str(e)) from None
    ev, tr = data["eval"], data["train"]
    n, m, T = len(ev["step"]), len(tr["step"]), len(data["task_names"])
    per_task = ev.get("success_env_index_")
    success = per_task if per_task is not None else np.full((n, T), np.nan)
    reward_tasks = ev.get("episode_reward_env_index_")
    return Run(path=log_path.parent, config=_load_config(log_path.parent), task_names=data["task_names"],
               steps=ev["step"].astype(np.int64), success=success.astype(np.float64),
               overall_success=_overall(per_task, ev.get("success"), n),
               reward=_overall(reward_tasks, ev.get("episode_reward"), n),
               train_steps=tr["step"].astype(np.int64),
               train={k: _overall(tr.get(f"{k}_env_index_"), tr.get(k), m) for k in TRAIN_CURVES})


def _value_text(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    text = json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= 24 else text[:23] + "…"


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """{dotted key: the fewest trailing parts naming it uniquely among ``keys``, "should_use_" dropped}."""

    def name(key, depth):
        parts = key.split(".")[-depth:]
        parts[-1] = re.sub(r"^should_(use_)?", "", parts[-1]) or parts[-1]
        return ".".join(parts)

    out = {}
    for key in keys:
        for depth in range(1, key.count(".") + 2):
            candidate = name(key, depth)
            if all(candidate != name(other, depth) for other in keys if other != key):
                break
        else:
            candidate = key
        out[key] = candidate
    return out


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
    shorts = short_keys(varying)
    for key, g in groups.items():
        flat = flat_by_key[key]
        if flat is not None and varying:
            g.settings = {k: flat.get(k) for k in varying}
            g.label = ", ".join(f"{k}={flat.get(k)}" for k in varying)
            g.short = ", ".join(f"{shorts[k]}={_value_text(flat.get(k))}" for k in varying)
        elif flat is not None:  # the only configuration below root
            g.label = root.resolve().name
        else:
            rel = os.path.relpath(g.runs[0].path.resolve(), root.resolve())
            g.label = root.resolve().name if rel == "." else rel
        g.short = g.short or g.label
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


def _nanmax(a) -> float:
    """Largest finite value; NaN for none (a run evaluated at step 0 only has no best yet)."""
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else math.nan


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


def curve(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, se) over the runs' (steps, values) series: at each step, over the runs holding it with a
    finite value (``mean_se``); a run that logged a step twice counts with its last row."""
    series = [(np.asarray(s, np.int64), np.asarray(v, np.float64)) for s, v in series if len(s)]
    if not series:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    steps = np.unique(np.concatenate([s for s, _ in series]))
    table = np.full((len(series), len(steps)), np.nan)
    for i, (s, v) in enumerate(series):
        at, last = np.unique(s[::-1], return_index=True)
        table[i, np.searchsorted(steps, at)] = v[::-1][last]
    finite = np.isfinite(table)
    n = finite.sum(axis=0)
    total = np.where(finite, table, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / n, np.nan)
        dev = np.where(finite, table - mean, 0.0)
        se = np.where(n > 1, np.sqrt((dev ** 2).sum(axis=0) / np.maximum(n - 1, 1)) / np.sqrt(n), np.nan)
    return steps, mean, se


def bin_width(max_step: int, bins: int = TRAIN_BINS) -> int:
    """The smallest 1, 2 or 5 x 10^k steps that cuts [0, max_step] into at most ``bins`` bins."""
    raw = max(max_step, 1) / bins
    exp = 10 ** math.floor(math.log10(raw))
    return int(next(m * exp for m in (1, 2, 5, 10) if m * exp >= raw))


def binned(steps, values, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, mean of the finite values in each bin) for bins [k*width, (k+1)*width) holding any."""
    steps, values = np.asarray(steps, np.int64), np.asarray(values, np.float64)
    ok = np.isfinite(values)
    index = steps[ok] // width
    bins, where = np.unique(index, return_inverse=True)
    sums = np.bincount(where, weights=values[ok], minlength=len(bins))
    counts = np.bincount(where, minlength=len(bins))
    return bins * width + width // 2, sums / np.maximum(counts, 1)


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


CSV_COLUMNS = ("runs", "pending", "last_step_min", "last_step_max", "task", "final_mean", "final_se", "best_mean",
               "best_se")


def write_csv(groups: Sequence[Group], path: pathlib.Path) -> None:
    """The table, one row per group and task (and "overall"); empty cells where the table shows "-" or no s.e."""
    keys = list(dict.fromkeys(k for g in groups for k in g.settings))

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return repr(v) if isinstance(v, float) else (json.dumps(v) if isinstance(v, (list, dict)) else str(v))

    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["group", *keys, *CSV_COLUMNS])
        for g in groups:
            s = summarize(g)
            steps = (min(s["last_steps"]), max(s["last_steps"])) if s["last_steps"] else ("", "")
            head = [g.label, *(cell(g.settings.get(k)) for k in keys), s["runs"], s["pending"], *steps]
            for name, v in [*s["tasks"].items(), ("overall", s["overall"])]:
                out.writerow([*head, name, *(cell(x) for x in (*v["final"], *v["best"]))])
    os.chmod(path, FILE_MODE)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_")[:120] or "run"


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    get: Callable[[Run], tuple[np.ndarray, np.ndarray]]  # run -> (steps, values)
    scale: str  # "fraction" (0..1), "linear" or "log" (linear if any value is <= 0)
    train: bool = False  # one row per episode: binned when there are many


def _train(key):
    return lambda r: (r.train_steps, r.train[key])


PANELS = (
    Panel("eval success", "success rate (fraction of episodes)", lambda r: (r.steps, r.overall_success), "fraction"),
    Panel("eval return", "episode return (sum of rewards)", lambda r: (r.steps, r.reward), "linear"),
    Panel("train success", "success rate (fraction of episodes)", _train("success"), "fraction", True),
    Panel("critic loss", "squared TD error (sum of both critics)", _train("critic_loss"), "log", True),
    Panel("actor loss", "α·log π − min Q", _train("actor_loss"), "linear", True),
    Panel("temperature α", "α (entropy weight)", _train("alpha_value"), "log", True),
)
XLABEL = "environment steps per task"


def _eng(steps: int) -> str:
    import matplotlib.ticker as mticker

    return mticker.EngFormatter(sep="")(steps)


def _styles(n: int) -> list[tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    size = cmap.N
    return [(cmap(i % size), ("-", "--", ":", "-.")[(i // size) % 4]) for i in range(n)]


def _draw(ax, series, style, scale) -> bool:
    """Mean with a one-s.e. band; False when there is nothing to draw."""
    steps, mean, se = curve(series)
    ok = np.isfinite(mean)
    if not ok.any():
        return False
    steps, mean, se = steps[ok], mean[ok], np.nan_to_num(se[ok])
    color, linestyle = style
    if len(steps) == 1:  # larger and on top (other curves' markers would hide it); a band of one step is no band
        ax.errorbar(steps, mean, yerr=se if se[0] > 0 else None, color=color, marker="o", markersize=6, capsize=4,
                    zorder=3)
        return True
    ax.plot(steps, mean, color=color, linestyle=linestyle, linewidth=1.4,
            marker="o" if len(steps) <= MARKER_MAX else None, markersize=3.5)
    if (se > 0).any():
        low = mean - se
        if scale == "log":
            low = np.where(low > 0, low, np.nan)  # a band reaching zero has no place on a log axis
        ax.fill_between(steps, low, mean + se, color=color, alpha=0.2, linewidth=0)
    return True


def _finish_axes(ax, title, ylabel, scale, log_y: bool, any_data: bool, xlabel=True):
    import matplotlib.ticker as mticker

    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    if xlabel:
        ax.set_xlabel(XLABEL, fontsize=9)
    lo, hi = ax.get_xlim()
    if hi - lo < 2:  # every point at one step: autoscaling would tick fractions of a step
        ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(mticker.EngFormatter(sep=""))  # 500k, 1M: steps read at a glance
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if scale == "fraction":
        ax.set_ylim(-0.03, 1.03)
    elif scale == "log" and any_data and log_y:
        ax.set_yscale("log")
    if not any_data:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")


def _log_useful(groups, get) -> bool:
    """A log axis: all values positive and spanning at least a factor of 10 (else linear reads better)."""
    values = np.concatenate([np.asarray(get(r)[1], np.float64) for g in groups for r in g.runs])
    values = values[np.isfinite(values)]
    return bool(len(values)) and values.min() > 0 and values.max() >= 10 * values.min()


def _legend(fig, groups, styles):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linestyle=ls, marker="o", markersize=3.5) for c, ls in styles]
    labels = [f"{g.short} (n={len(g.runs)})" for g in groups]
    width = max(len(t) for t in labels)
    ncols = max(1, min(len(labels), 170 // (width + 8)))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=9, frameon=False)


def _title(groups) -> str:
    if len(groups) == 1:
        g = groups[0]
        head = textwrap.shorten(g.label, 140, placeholder=" …")
        return f"{head}: {len(g.runs)} run{'s' if len(g.runs) != 1 else ''}, mean ± 1 s.e."
    return f"{len(groups)} configurations, mean ± 1 s.e. over each one's runs"


def _series(panel: Panel, run: Run, bin_steps: int | None) -> tuple[np.ndarray, np.ndarray]:
    steps, values = panel.get(run)
    return binned(steps, values, bin_steps) if bin_steps else (steps, values)


def _overview(groups, styles, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5 + (0.3 * len(groups) if len(groups) > 1 else 0)),
                             layout="constrained")
    runs = [r for g in groups for r in g.runs]
    width = None
    if max(len(r.train_steps) for r in runs) > TRAIN_BINS:
        width = bin_width(max(int(r.train_steps.max()) for r in runs if len(r.train_steps)))
    for ax, panel in zip(axes.flat, PANELS):
        bins = width if panel.train else None
        drew = [_draw(ax, [_series(panel, r, bins) for r in g.runs], st, panel.scale) for g, st in zip(groups, styles)]
        title = panel.title + (f" (mean per {_eng(bins)}-step bin)" if bins else "")
        _finish_axes(ax, title, panel.ylabel, panel.scale, _log_useful(groups, panel.get), any(drew))
    fig.suptitle(_title(groups), fontsize=11)
    if len(groups) > 1:
        _legend(fig, groups, styles)
    _save(fig, path)


def _tasks(groups, styles, path):
    import matplotlib.pyplot as plt

    names = groups[0].runs[0].task_names
    T = len(names)
    ncols = min(T, 5)
    nrows = math.ceil(T / ncols)
    extra = 0.3 * len(groups) if len(groups) > 1 else 0
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 0.8, 2.5 * nrows + 0.8 + extra), sharex=True,
                             sharey=True, layout="constrained", squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= T:
            ax.set_visible(False)
            continue
        drew = [_draw(ax, [(r.steps, r.success[:, i]) for r in g.runs], st, "fraction")
                for g, st in zip(groups, styles)]
        last_in_column = i + ncols >= T
        _finish_axes(ax, names[i], "success rate" if i % ncols == 0 else "", "fraction", False, any(drew),
                     xlabel=last_in_column)
        if last_in_column:
            ax.xaxis.set_tick_params(labelbottom=True)  # a panel above an empty slot is the column's last
    fig.suptitle("eval success per task — " + _title(groups), fontsize=11)
    if len(groups) > 1:
        _legend(fig, groups, styles)
    _save(fig, path)


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    os.chmod(path, FILE_MODE)


def plot(groups: Sequence[Group], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes the PNGs of the module doc; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    groups = [g for g in groups if g.runs]
    styles = _styles(len(groups))
    targets, used = [], {"comparison", "comparison_tasks"}
    for g, style in zip(groups, styles):
        slug, n = _slug(g.label), 2
        while slug in used or f"{slug}_tasks" in used:  # labels cut to the same 120 characters
            slug, n = f"{_slug(g.label)[:115]}-{n}", n + 1
        used |= {slug, f"{slug}_tasks"}
        targets.append(([g], [style], slug))
    if len(groups) > 1:
        targets.append((groups, styles, "comparison"))
    written = []
    for gs, st, name in targets:
        _overview(gs, st, out_dir / f"{name}.png")
        _tasks(gs, st, out_dir / f"{name}_tasks.png")
        written += [out_dir / f"{name}.png", out_dir / f"{name}_tasks.png"]
    return written


def make_report(path, out_dir=None,
                ignore: Sequence[str] = DEFAULT_IGNORE) -> tuple[str, list[Group], list[pathlib.Path]]:
    """Reads every log below ``path``, writes report.txt, report.csv and the plots; returns (table, groups,
    files)."""
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
        csv_path = out / "report.csv"
        write_csv(groups, csv_path)
        pngs = plot(groups, out)
    except OSError as e:
        raise ReportError(
            f"cannot write the report into {out} ({e}); pass --out DIR with a writable directory") from None
    return table, groups, [text_path, csv_path, *pngs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtrl_hpc.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory, a sweep directory, or a metrics.h5 file")
    parser.add_argument("--out", help="where to write report.txt, report.csv and the plots (default: PATH/report)")
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
