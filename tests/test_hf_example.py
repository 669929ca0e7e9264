"""examples/hf_finetune.py run the way a user runs it: a tiny Llama folder written by
transformers, torchrun on 4 processes (dp 2 x tp 2, gloo), checkpoints, a resume that
continues exactly, save_pretrained's folder loaded back by transformers, a sample."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "hf_finetune.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEP = re.compile(r"step (\d+)/\d+ loss ([0-9.]+)")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(*flags: str, cwd: Path) -> str:
    cmd = [str(TORCHRUN), "--nproc_per_node=4", str(SCRIPT), "--model", "tiny", *flags]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_finetune_checkpoint_resume_save_and_sample(tmp_path):
    made = subprocess.run([sys.executable, str(SCRIPT), "--make-model", "tiny"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    out = run("--steps", "4", "--checkpoint-dir", "ck", "--checkpoint-every", "2",
              "--out", "tuned", cwd=tmp_path)
    assert "dp 2 x tp 2" in out and "greedy sample:" in out
    full = {int(s): float(v) for s, v in STEP.findall(out)}
    assert sorted(full) == [1, 2, 3, 4], out[-3000:]

    from transformers import AutoModelForCausalLM
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    moved = [n for n, p in tuned.named_parameters()
             if not torch.equal(p, dict(first.named_parameters())[n])]
    assert len(moved) == len(list(tuned.parameters())), "training changed every weight"

    shutil.rmtree(tmp_path / "ck" / "step-000004")  # as if stopped after step 2's checkpoint
    resumed = run("--steps", "4", "--checkpoint-dir", "ck", "--resume", cwd=tmp_path)
    assert "resumed from ck/step-000002 (step 2)" in resumed, resumed[-3000:]
    again = {int(s): float(v) for s, v in STEP.findall(resumed)}
    assert sorted(again) == [3, 4]
    assert all(abs(again[s] - full[s]) <= 1e-5 for s in again), (again, full)
