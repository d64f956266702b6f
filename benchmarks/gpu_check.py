"""GPU check of a node: every GPU test (CUDA against CPU for the loss kernels and the replay buffer) and a short
CUDA training run (MT1 reach-v3) checkpointed at step 100 and resumed to step 200, with one PASS/FAIL line per
check and a summary. Builds nothing: mtrl_hpc._C must already hold CUDA kernels (built with a CUDA torch:
pip install --no-build-isolation -e .). Takes about 2-3 minutes on one GPU; stops at --budget seconds.

    python benchmarks/gpu_check.py                        # from anywhere; runs in the repository root
    python benchmarks/gpu_check.py --work-dir DIR         # keep the run directories under DIR

Exit status: 0 every check passed; 1 a check failed; 2 SKIPPED: torch sees no CUDA device here, nothing ran.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
PASSED, FAILED, SKIPPED = 0, 1, 2

# Small and quick: one task, 10-step episodes, 2x64 networks, updates from step 20; checkpoints at 100 and 200.
RUN = ["env=metaworld-mt1", "env.task_name=reach-v3", "setup.device=cuda", "setup.seed=1",
       "agent.actor.hidden_dim=64", "agent.actor.num_layers=2", "agent.encoder.feedforward.hidden_dim=16",
       "agent.multitask.task_encoder_cfg.model_cfg.hidden_dim=16", "replay_buffer.batch_size=128",
       "replay_buffer.capacity=2000", "env.max_episode_steps=10", "experiment.init_steps=20",
       "experiment.eval_freq=100", "experiment.save.freq=100", "experiment.num_eval_episodes=1",
       "experiment.save.model.retain_last_n=-1", "logger.progress_bar=false", "setup.num_threads=1"]
LOSS_OPS = [f"{loss}_loss{suffix}" for loss in ("critic", "actor", "temperature") for suffix in ("", "_backward")]


class Report:
    def __init__(self, budget: float):
        self.start, self.budget, self.results = time.monotonic(), budget, []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def record(self, ok: bool, name: str, detail: str = "", seconds: float = 0.0, log: str = "") -> bool:
        self.results.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name:<52} {seconds:6.1f} s  {detail}", flush=True)
        if not ok and log:
            print("      " + "\n      ".join(log.strip().splitlines()[-40:]), flush=True)
        return ok

    def info(self, name: str, detail: str) -> None:
        print(f"INFO  {name:<52}           {detail}", flush=True)


def run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1))
        return out.returncode, out.stdout + out.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as error:
        text = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
        return -1, text + f"\n(stopped after {timeout:.0f} s: out of the time budget)", time.monotonic() - t0


def check_kernels(report: Report) -> bool:
    """The CUDA kernels exist and launch on this GPU (a missing arch shows here as 'no kernel image')."""
    t0 = time.monotonic()
    try:
        from mtrl_hpc import losses  # loads mtrl_hpc._C
    except ImportError as error:
        return report.record(False, "mtrl_hpc._C loads", str(error).splitlines()[0])
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = [op for op in ["replay_add", "replay_sample", *LOSS_OPS] if not has(f"mtrl_hpc::{op}", "CUDA")]
    if missing:
        return report.record(False, "mtrl_hpc._C has CUDA kernels", f"none for {', '.join(missing)}: rebuild with a "
                             "CUDA torch (pip install --no-build-isolation -e .)")
    try:
        x = torch.ones(4, 1, device="cuda")
        loss = losses.actor_loss(x, x, x, torch.zeros(2, device="cuda"), torch.tensor([0, 0, 1, 1], device="cuda"), 2)
        ok = torch.equal(loss.cpu(), torch.zeros(2))  # alpha = 1: 1 * 1 - min(1, 1)
        detail = "" if ok else f"actor_loss gave {loss.tolist()}, expected [0, 0]"
    except RuntimeError as error:
        ok, detail = False, str(error).splitlines()[0]
    return report.record(ok, "the extension's CUDA kernels run on this GPU", detail, time.monotonic() - t0)


def check_pytest(report: Report, name: str, args: list[str], work: pathlib.Path) -> bool:
    xml = work / f"{name.replace(' ', '_').replace('/', '_')}.xml"
    code, text, seconds = run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", *args], report.left())
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    detail = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    # On a GPU node nothing may skip: a skip would hide a test that never ran.
    ok = code == 0 and counts["tests"] > 0 and counts["skipped"] == 0
    return report.record(ok, name, detail, seconds, text)


def train_metrics(run_dir: pathlib.Path) -> dict:
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        return {f"{k}/{n}": f[k][n][()] for k in ("train", "eval") for n in f[k] if n != "duration"}


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")


def checkpoints(run_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.h5"))


def train(report: Report, run_dir: pathlib.Path, steps: int) -> tuple[int, str, float]:
    return run([sys.executable, "-m", "mtrl_hpc.main", *RUN, f"experiment.num_train_steps={steps}",
                f"hydra.run.dir={run_dir}"], report.left())


def check_training(report: Report, work: pathlib.Path) -> None:
    resumed = work / "resumed"
    code, text, seconds = train(report, resumed, 100)
    problems = [] if code == 0 else [f"exit status {code}"]
    if code == 0:
        m = train_metrics(resumed)
        if list(m["train/step"]) != list(range(10, 101, 10)):
            problems.append(f"train steps {list(m['train/step'])}")
        if checkpoints(resumed) != [100]:
            problems.append(f"checkpoints at {checkpoints(resumed)}, expected [100]")
        if not np.isfinite(m["train/critic_loss"][2:]).all():
            problems.append("non-finite critic loss")
    if not report.record(not problems, "train 100 steps on cuda, checkpoint at 100", "; ".join(problems), seconds,
                         text):
        return
    first = train_metrics(resumed)

    code, text, seconds = train(report, resumed, 200)
    problems = [] if code == 0 else [f"exit status {code}"]
    if code == 0:
        m = train_metrics(resumed)
        if "at step 100" not in text or "resumed from" not in text:
            problems.append("no 'resumed from ... at step 100' in the log")
        if list(m["train/step"]) != list(range(10, 201, 10)):
            problems.append(f"train steps {list(m['train/step'])}, expected 10, 20, ..., 200")
        if checkpoints(resumed) != [100, 200]:
            problems.append(f"checkpoints at {checkpoints(resumed)}, expected [100, 200]")
        if list(m["eval/step"]) != [0, 100, 200]:
            problems.append(f"eval steps {list(m['eval/step'])}, expected [0, 100, 200]")
        changed = [k for k in first if not same(m[k][:len(first[k])], first[k])]
        if changed:
            problems.append(f"rows logged before the resume changed: {changed[:3]}")
        if not np.isfinite(m["train/critic_loss"][2:]).all():
            problems.append("non-finite critic loss")
    if not report.record(not problems, "resume from step 100 and train on to 200", "; ".join(problems), seconds,
                         text):
        return

    # Whether a resumed CUDA run is bitwise the uninterrupted one (the CPU guarantee, tests/test_resume.py):
    # reported, not required.
    whole = work / "uninterrupted"
    code, text, seconds = train(report, whole, 200)
    if code != 0:
        report.record(False, "uninterrupted 200-step run on cuda", f"exit status {code}", seconds, text)
        return
    a, b = train_metrics(resumed), train_metrics(whole)
    differ = [k for k in b if k not in a or not same(a[k], b[k])]
    report.info("resumed run against an uninterrupted one",
                "identical metrics" if not differ else f"metrics differ: {', '.join(differ[:4])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", help="where the run directories go (default: a temporary directory)")
    parser.add_argument("--budget", type=float, default=290.0, help="seconds for all checks together")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        why = ("this torch is a CPU build" if torch.version.cuda is None
               else f"torch {torch.__version__} finds no CUDA device or driver")
        print(f"gpu_check: SKIPPED: no GPU present ({why}); no GPU check ran. Run it on a GPU node.")
        return SKIPPED
    sys.path.insert(0, str(REPO))  # the checkout's package, as `python -m mtrl_hpc.main` from REPO uses
    props = torch.cuda.get_device_properties(0)
    print(f"gpu_check: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), budget {args.budget:.0f} s", flush=True)
    report = Report(args.budget)
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = pathlib.Path(args.work_dir) if args.work_dir else pathlib.Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if check_kernels(report):
            check_pytest(report, "pytest tests/test_cuda_parity.py", ["tests/test_cuda_parity.py"], work)
            check_pytest(report, "pytest tests/test_replay.py -k cuda", ["tests/test_replay.py", "-k", "cuda"], work)
            check_training(report, work)
    failed = report.results.count(False)
    total = time.monotonic() - report.start
    print(f"gpu_check: {'PASSED' if not failed else 'FAILED'}: {len(report.results) - failed} passed, {failed} failed "
          f"in {total:.0f} s")
    return PASSED if not failed else FAILED


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
