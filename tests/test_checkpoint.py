"""DCP checkpoints of the 2-D (dp, tp) model: bit-exact round trips, exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests import jobs_checkpoint as J
from tpcompile import checkpoint as ckpt


def test_sharded_to_plain_and_back_bit_exact(pool, tmp_path):
    for r in pool.run(J.roundtrip, str(tmp_path)):
        assert len(r["to_plain"]) == 21 and all(r["to_plain"].values()), r["to_plain"]
        assert len(r["from_plain"]) == 21 and all(r["from_plain"].values()), r["from_plain"]
        assert "All keys matched" in r["keys"]  # strict load: no key missing or extra
        assert r["plain_type"] == "Parameter"
        assert "optimizer=None" in r["no_optim_error"]


def test_resume_gives_the_same_losses(pool, tmp_path):
    for r in pool.run(J.resume, str(tmp_path)):
        assert r["found"] == "step-000002" and r["start"] == 2
        assert r["resumed"] == r["straight"], r  # exact: same data, same state, same order


def _plain(tmp_path: Path) -> Path:
    src = tmp_path / "model.pt"
    torch.save({"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}, src)
    return src


def test_latest_skips_incomplete(tmp_path):
    good = ckpt.from_torch_save(_plain(tmp_path), tmp_path / "step-000002")
    (tmp_path / "step-000006").mkdir()  # cut short before the metadata: no .metadata
    cut = tmp_path / "step-000004"  # metadata written halfway
    shutil.copytree(good, cut)
    data = (cut / ".metadata").read_bytes()
    (cut / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="skipping .*step-000006") as w:
        assert ckpt.latest(tmp_path) == good
    assert any("step-000004" in str(x.message) for x in w)
    assert ckpt.latest(tmp_path / "nothing") is None
    with pytest.raises(ckpt.CheckpointError, match="not a complete DCP checkpoint"):
        ckpt.load(cut, torch.nn.Linear(3, 2), None)


def test_cli_failures_are_one_line_and_nonzero(tmp_path, capsys):
    src = _plain(tmp_path)
    step = tmp_path / "step-000001"
    assert ckpt._main(["from-torch", str(src), str(step)]) == 0
    files = sorted(p.name for p in step.iterdir())
    capsys.readouterr()
    cases = [
        (["from-torch", str(src), str(step)], "holds a checkpoint"),  # never written over
        (["from-torch", str(tmp_path / "no.pt"), str(tmp_path / "new")], "does not exist"),
        (["from-torch", str(step / ".metadata"), str(tmp_path / "new")], "not a torch.save file"),
        (["to-torch", str(tmp_path / "nothing"), str(tmp_path / "x.pt")], "not a complete DCP"),
        (["to-torch", str(step), str(tmp_path / "no" / "x.pt")], "does not exist"),
    ]
    for argv, fragment in cases:
        assert ckpt._main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, (argv, err)
    assert sorted(p.name for p in step.iterdir()) == files and ckpt.complete(step)
    assert not (tmp_path / "new").exists()
    assert ckpt._main(["to-torch", str(step), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt")
    assert torch.equal(back["w"], torch.arange(6.0).view(2, 3))


def test_a_save_cut_short_leaves_the_complete_one_alone(tmp_path, monkeypatch):
    """Saving a step again over a complete checkpoint of it, and dying half-way: the old
    checkpoint still loads, whole, and the half-written one is never picked up."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ckpt.save(tmp_path, model, None, 4)
    with torch.no_grad():
        model.weight.fill_(2.0)

    write = dcp.FileSystemWriter.write_data

    def dies_after_writing(self, plan, planner):
        write(self, plan, planner).wait()  # the new shards reach the disk...
        raise RuntimeError("killed before the metadata")  # ...the metadata never does

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", dies_after_writing)
    with pytest.raises(dcp.api.CheckpointException):  # wraps the error above
        ckpt.save(tmp_path, model, None, 4)
    monkeypatch.undo()
    assert ckpt.latest(tmp_path) == tmp_path / "step-000004"
    fresh = torch.nn.Linear(3, 2)
    assert ckpt.load(tmp_path / "step-000004", fresh, None) == 4
    assert torch.equal(fresh.weight, torch.ones(2, 3))  # the old values, not a mix
    ckpt.save(tmp_path, model, None, 4)  # a later save of the step replaces it, clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]
    assert ckpt.load(tmp_path / "step-000004", fresh, None) == 4
    assert torch.equal(fresh.weight, torch.full((2, 3), 2.0))


def test_a_model_only_checkpoint_resumes_with_a_fresh_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    src = tmp_path / "model.pt"
    torch.save({"weight": torch.full((2, 3), 5.0), "bias": torch.zeros(2)}, src)
    assert ckpt._main(["from-torch", str(src), str(tmp_path / "ck" / "step-000003"),
                       "--step", "3"]) == 0
    found = ckpt.latest(tmp_path / "ck")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ckpt.CheckpointError, match="require_optimizer_state=False"):
        ckpt.load(found, model, opt)
    with pytest.warns(UserWarning, match="optimizer starts fresh"):
        assert ckpt.load(found, model, opt, require_optimizer_state=False) == 3
    assert torch.equal(model.weight, torch.full((2, 3), 5.0)) and not opt.state
