"""examples/hf_finetune.py run the way a user runs it: a tiny Llama folder written by
transformers, torchrun on 4 processes (dp 2 x tp 2, gloo), checkpoints, a resume that
continues exactly, save_pretrained's folder loaded back by transformers, a sample; and
under ``torchrun --max-restarts=1`` with a worker SIGKILLed after a step or in the middle
of a checkpoint save, the restarted group resumes from the last complete checkpoint and
ends with the uninterrupted run's losses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "hf_finetune.py"
FAULT = ROOT / "tests" / "elastic_fault.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEP = re.compile(r"step (\d+)/\d+ loss ([0-9.]+)")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(*flags: str, cwd: Path, kill: str | None = None) -> str:
    """torchrun the example on 4 processes; with ``kill`` (elastic_fault's TPC_KILL) one
    worker dies on the first start and ``--max-restarts=1`` brings the group back."""
    env = _env()
    cmd = [str(TORCHRUN), "--nproc_per_node=4"]
    if kill:
        env["TPC_KILL"] = kill
        cmd += ["--max-restarts=1", str(FAULT)]
    cmd += [str(SCRIPT), "--model", "tiny", *flags]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(out: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in STEP.findall(out)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The uninterrupted run: 6 steps, a checkpoint every 2, saved with save_pretrained."""
    here = tmp_path_factory.mktemp("finetune")
    made = subprocess.run([sys.executable, str(SCRIPT), "--make-model", "tiny"], cwd=here,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    out = run("--steps", "6", "--checkpoint-dir", "ck", "--checkpoint-every", "2",
              "--out", "tuned", cwd=here)
    assert "dp 2 x tp 2" in out and "greedy sample:" in out
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6], out[-3000:]
    return here, losses(out)


def test_finetune_checkpoint_resume_save_and_sample(trained):
    here, full = trained
    from transformers import AutoModelForCausalLM
    tuned = AutoModelForCausalLM.from_pretrained(here / "tuned")
    first = AutoModelForCausalLM.from_pretrained(here / "tiny")
    moved = [n for n, p in tuned.named_parameters()
             if not torch.equal(p, dict(first.named_parameters())[n])]
    assert len(moved) == len(list(tuned.parameters())), "training changed every weight"

    ck = here / "ck-resume"
    shutil.copytree(here / "ck", ck)
    for step in ("step-000006", "step-000004"):  # as if stopped after step 2's checkpoint
        shutil.rmtree(ck / step)
    resumed = run("--steps", "6", "--checkpoint-dir", "ck-resume", "--resume", cwd=here)
    assert "resumed from ck-resume/step-000002 (step 2)" in resumed, resumed[-3000:]
    again = losses(resumed)
    assert sorted(again) == [3, 4, 5, 6]
    assert all(abs(again[s] - full[s]) <= 1e-5 for s in again), (again, full)


@pytest.mark.parametrize("kill, resumes_at", [
    ("3:step:5", 4),  # rank 3 SIGKILLed after step 4 (and its checkpoint), before step 5
    ("1:save:2", 2),  # rank 1 SIGKILLed inside step 4's checkpoint save, before writing
])
def test_elastic_restart_resumes_from_the_last_complete_checkpoint(trained, kill, resumes_at):
    here, full = trained
    name = "ck-" + kill.replace(":", "-")
    out = run("--steps", "6", "--checkpoint-dir", name, "--checkpoint-every", "2", "--resume",
              cwd=here, kill=kill)
    assert f"elastic_fault: killing rank {kill.split(':')[0]}" in out, out[-3000:]
    assert f"resumed from {name}/step-{resumes_at:06d} (step {resumes_at})" in out, out[-4000:]
    after = losses(out.split("resumed from", 1)[1])
    assert sorted(after) == list(range(resumes_at + 1, 7)), out[-3000:]
    assert all(abs(after[s] - full[s]) <= 1e-5 for s in after), (after, full)
    steps = sorted(p.name for p in (here / name).iterdir())
    assert steps == ["step-000002", "step-000004", "step-000006"], steps  # no .partial left
