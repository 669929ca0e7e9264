"""``python -m tpcompile``: explain on the 7B config as a subprocess, output formats, model
files that do not say what to build, and the checked-in plans regenerated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpcompile.cli.main import main
from tpcompile.cli.explain import Explanation

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_explain_7b_subprocess():
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "tpcompile", "explain", "models/llama2.py",
                        "--tp", "8"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    print(f"explain 7B --tp 8: {time.perf_counter() - t0:.2f} s (process, torch import included)")
    assert p.returncode == 0, p.stderr
    for text in ("layers.*  (32 x TransformerBlock)", "attention.wo", "rowwise",
                 "Collectives per step", "[1, 2048, 4096]", "Megatron minimum",
                 "parameters 1.57 GiB", "Left replicated"):
        assert text in p.stdout, text


@pytest.mark.parametrize("argv,fragment", [
    (["--tp", "0"], "argument --tp: 0 is not a positive integer"),
    (["--dp", "-3"], "argument --dp: -3 is not a positive integer"),
    (["--seq", "x"], "argument --seq: 'x' is not an integer"),
    (["--tp", "2", "--seq", "7"], "seq = 7 is not divisible by tp = 2"),
])
def test_explain_arguments_are_checked(capsys, argv, fragment):
    try:
        code = main(["explain", "models/llama2.py", "--config", "debug", *argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err.strip().splitlines()[-1], err
    assert "Traceback" not in err


def test_explain_without_sp_takes_any_sequence_length(capsys):
    code, out, _ = run(capsys, "explain", "models/llama2.py", "--config", "debug", "--tp", "2",
                       "--seq", "7", "--no-sp", "--dtype", "fp32")
    assert code == 0 and "all_reduce" in out and "reduce_scatter" not in out


def test_json_format(capsys):
    code, out, _ = run(capsys, "explain", "models/llama2.py", "--config", "debug", "--tp", "2",
                       "--seq", "16", "--dtype", "fp32", "--format", "json")
    assert code == 0
    e = Explanation.model_validate(json.loads(out))
    assert (e.tp, e.seq, e.dtype) == (2, 16, "float32")
    assert {b.path for b in e.blocks} == {"<root>", "layers.*"}


def test_dot_and_html(capsys, tmp_path):
    code, out, _ = run(capsys, "explain", "models/toy.py", "--config", "gated", "--tp", "2",
                       "--seq", "8", "--format", "dot")
    assert code == 0 and out.startswith('digraph "layers.*"')
    assert "reduce_scatter (forward)" in out and "octagon" in out and '"norm" ->' in out
    page = tmp_path / "x.html"
    assert main(["explain", "models/toy.py", "--model", "ToyModel", "--tp", "2", "--seq", "1",
                 "--format", "html", "-o", str(page)]) == 0
    assert "<table" in page.read_text() and "all_reduce (forward)" in page.read_text()


def test_explain_a_plan_file(capsys):
    code, out, _ = run(capsys, "explain", "models/llama2.py", "--config", "debug", "--tp", "2",
                       "--seq", "8", "--plan", str(ROOT / "plans/llama2-debug.yaml"))
    assert code == 0 and "feed_forward.w2" in out


def test_file_without_a_model(capsys, tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\n\ndef helper():\n    return 1\n")
    code, _, err = run(capsys, "explain", str(f))
    assert code == 2 and "def build_model(" in err and "--model NAME" in err
    code, _, err = run(capsys, "explain", str(f), "--model", "Net")
    assert code == 2 and "no callable named 'Net'" in err and "helper" in err
    code, _, err = run(capsys, "explain", str(f), "--model", "helper")
    assert code == 2 and "returned int, not an nn.Module" in err


def test_too_long_sequence_is_reported(capsys):
    code, _, err = run(capsys, "explain", "models/llama2.py", "--config", "debug", "--tp", "2",
                       "--seq", "4096")
    assert code == 2 and "(1, 4096" in err


@pytest.mark.parametrize("plan", sorted((ROOT / "plans").glob("*.yaml")), ids=lambda p: p.name)
def test_checked_in_plans_regenerate(plan, tmp_path, capsys):
    header = plan.read_text().splitlines()[0]
    assert header.startswith("# written by: python -m tpcompile plan ")
    argv = header.removeprefix("# written by: python -m tpcompile ").split()
    out = tmp_path / plan.name
    argv[argv.index("-o") + 1] = str(out)
    assert main(argv) == 0
    assert out.read_text().splitlines()[1:] == plan.read_text().splitlines()[1:]
