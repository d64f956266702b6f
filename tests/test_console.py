"""What a run prints: banner, train lines with rates, plain progress lines without a TTY, per-task lines that
stay readable for MT50, main.log holding every console line, the --help page, the CUDA generator of the
training device only."""

import re
import subprocess
import sys

import pytest
import torch

from mtrl_hpc import experiment
from mtrl_hpc.console import ProgressLine, clock, task_lines
from mtrl_hpc.agents import make_agent
from test_train import TINY, make_cfg


def test_task_lines_wrap_at_the_width_and_keep_every_task():
    names = [f"task-number-{i}-v3" for i in range(10)]
    lines = task_lines("success per task", names, [i / 10 for i in range(10)], width=60)
    assert all(len(l) <= 60 for l in lines) and len(lines) > 1
    assert re.findall(r"(\S+)=(\d\.\d\d)", " ".join(lines)) == [(n, f"{i / 10:.2f}") for i, n in enumerate(names)]


def test_task_lines_for_many_tasks_name_the_lowest_and_highest():
    names = [f"t{i}" for i in range(50)]
    values = [(i * 37 % 50) / 50 for i in range(50)]  # a permutation of 0, 0.02, ..., 0.98
    lines = task_lines("success per task", names, values)
    assert len(lines) == 3 and all(len(l) <= 100 for l in lines)
    assert lines[0] == f"  success per task (50 tasks, mean {sum(values) / 50:.2f})"
    order = sorted(range(50), key=lambda i: values[i])
    assert lines[1] == "    lowest:  " + ", ".join(f"t{i}={values[i]:.2f}" for i in order[:5])
    assert lines[2] == "    highest: " + ", ".join(f"t{i}={values[i]:.2f}" for i in order[::-1][:5])


def test_progress_line_every_n_episodes_with_eta(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("mtrl_hpc.console.time.monotonic", lambda: now[0])
    progress = ProgressLine(total_steps=1000, start_step=200, every=2)
    now[0] = 110.0  # 100 steps in 10 s: 10 steps/s, 700 steps left
    assert progress.line(300, episode=3) is None
    assert progress.line(300, episode=4) == "progress: step 300/1000 (30.0%), 10 steps/s, elapsed 0:00:10, ETA 0:01:10"
    assert ProgressLine(1000, 0, every=0).line(500, episode=10) is None
    assert clock(3725.9) == "1:02:05" and clock(float("inf")) == "?"


def test_a_run_prints_banner_rates_and_progress_and_logs_them_all(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mtrl_hpc.main", *TINY, "logger.progress_every=2", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "mtrl_hpc: building metaworld-mt10 (10 tasks) and state_sac on cpu ..."
    banner = "\n".join(lines[1:9])
    assert f"run directory  {run_dir.resolve()}" in banner and "device         cpu, 1 CPU thread" in banner
    assert "seed           1" in banner and "env            metaworld-mt10: 10 tasks (reach-v3," in banner
    assert "start          fresh" in banner
    assert f"to resume      python -m mtrl_hpc.main {' '.join(TINY)} logger.progress_every=2 hydra.run.dir={run_dir.resolve()}" in banner
    # The parameter count is what is trained: the agent's parameters that take gradients (targets do not).
    count = int(re.search(r"agent          state_sac, ([\d,]+) parameters", banner).group(1).replace(",", ""))
    agent = make_agent(make_cfg(run_dir).agent, 39, 4, 10, "cpu", task_names=[f"t{i}" for i in range(10)])
    assert count == sum(p.numel() for p in agent.parameters() if p.requires_grad)
    train = [l for l in lines if l.startswith("| train")]
    assert len(train) == 6 and all(re.search(r"\| SPS: \d+ \| UPS: \d+ \| T: \d+:\d\d:\d\d \|$", l) for l in train)
    assert re.search(r"UPS: 0 ", train[0]) and not re.search(r"UPS: 0 ", train[-1])  # updates start at step 20
    progress = [l for l in lines if l.startswith("progress:")]
    assert [l.split(",")[0] for l in progress] == ["progress: step 20/60 (33.3%)", "progress: step 40/60 (66.7%)",
                                                   "progress: step 60/60 (100.0%)"]
    log = (run_dir / "main.log").read_text()
    for line in lines:
        assert line in log, line
    # Resumed: the banner says from which step.
    again = subprocess.run(cmd[:-1] + ["experiment.num_train_steps=80", f"hydra.run.dir={run_dir}"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "start          resumed from the checkpoint at step 60" in again.stdout


def test_help_is_a_page_of_its_own():
    out = subprocess.run([sys.executable, "-m", "mtrl_hpc.main", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert out.stdout.startswith("python -m mtrl_hpc.main [-m] [group=option ...] [key=value ...]")
    assert "agent/components" not in out.stdout and "agent/optimizers" not in out.stdout
    for needle in ("env=metaworld-mt10", "hydra/launcher=submitit_slurm", "experiment.resume=latest", "Examples:",
                   "README.md", "setup.seed=1,2,3"):
        assert needle in out.stdout, needle


class _FakeCuda:
    """Records what the checkpoint code asks of torch.cuda's generators."""

    def __init__(self):
        self.calls = []

    def get_rng_state(self, device="cuda"):
        self.calls.append(("get", device))
        return torch.full((16,), 7, dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.calls.append(("set", device, state.tolist()))

    def get_rng_state_all(self):
        raise AssertionError("every device's state was read")

    def set_rng_state_all(self, states):
        raise AssertionError("every device's state was written")


@pytest.mark.parametrize("state, device, expected", [
    (torch.arange(16, dtype=torch.uint8), "cuda:1", [("set", "cuda:1", list(range(16)))]),
    (torch.arange(32, dtype=torch.uint8).reshape(2, 16), "cuda:1", [("set", "cuda:1", list(range(16, 32)))]),
    (torch.arange(16, dtype=torch.uint8).reshape(1, 16), "cuda:1", []),  # an older checkpoint without that device
    ([], "cuda", []), (torch.arange(16, dtype=torch.uint8), "cpu", []),
])
def test_resume_restores_the_training_devices_generator_only(monkeypatch, state, device, expected):
    fake = _FakeCuda()
    monkeypatch.setattr(experiment.torch, "cuda", fake)
    experiment._restore_cuda_rng(state, device)
    assert fake.calls == expected
