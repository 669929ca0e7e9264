"""The example, run the way a user runs it: torchrun, 4 processes (dp 2 x tp 2), gloo.
Tiny sizes (debug config, 6 steps) keep one run at ~20 s on 2 CPU cores."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ITER = re.compile(r"2D iter (\d+) complete, loss ([0-9.]+)")


def run_example(*flags: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds the repo
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(TORCHRUN), "--nproc_per_node=4", str(ROOT / "examples" / "compiled_llama.py"),
           "--config", "debug", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", *flags]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(out: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in ITER.findall(out)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example")
    out = run_example("--steps", "6", "--checkpoint-dir", str(tmp / "ckpt"),
                      "--checkpoint-every", "3", cwd=tmp)
    return tmp, out


def test_example_trains(first_run):
    tmp, out = first_run
    assert "Device Mesh created: device_mesh=DeviceMesh((dp=2, tp=2), 'cpu'" in out
    assert "2D training successfully completed!" in out
    assert re.search(r"Summary: .* tokens/s", out) and "peak RSS per rank" in out
    got = losses(out)
    assert sorted(got) == list(range(6)), out[-3000:]
    assert got[5] < got[0] - 0.05, got  # the loss falls
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == ["step-000003", "step-000006"]


def test_example_resume_continues_exactly(first_run):
    tmp, out = first_run
    shutil.rmtree(tmp / "ckpt" / "step-000006")  # as if stopped after step 3's checkpoint
    resumed = run_example("--steps", "6", "--checkpoint-dir", str(tmp / "ckpt"), "--resume",
                          cwd=tmp)
    assert "at step 3" in resumed, resumed[-3000:]
    again = losses(resumed)
    assert sorted(again) == [3, 4, 5]
    assert all(again[s] == losses(out)[s] for s in again), (again, losses(out))
