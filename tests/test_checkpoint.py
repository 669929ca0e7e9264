"""DCP checkpoints of the 2-D (dp, tp) model: bit-exact round trips, exact resume."""

from __future__ import annotations

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


def test_latest_skips_incomplete(tmp_path):
    (tmp_path / "step-000004").mkdir()  # cut short: no .metadata
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "step-000002" / ".metadata").write_bytes(b"")
    assert ckpt.latest(tmp_path).name == "step-000002"
    assert ckpt.latest(tmp_path / "nothing") is None
