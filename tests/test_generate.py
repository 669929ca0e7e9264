"""Greedy generation on the parallel module: the same tokens as the unsharded model.

The prompt has an odd length and every other step is odd, which sequence parallelism
cannot split over tp 2: those calls run the program without it (same weights), the even
ones the sequence-parallel program."""

from __future__ import annotations

import pytest
import torch

import tpcompile
from tests import jobs_generate as J


@pytest.mark.parametrize("name", ["hf_llama", "llama", "nanogpt"])
def test_greedy_tokens_equal_the_unsharded_model(pool, name):
    res = pool.run(J.greedy, name, 2, 7, 16)
    for r in res:
        assert len(r["want"][0]) == 7 + 16
        assert r["got"] == r["want"]
        assert r["variants"] == [False, True], "both the SP and the no-SP program must run"


def test_generate_stops_at_eos_and_refuses_negative_lengths():
    class Echo(torch.nn.Module):  # always predicts token 5
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full_like(ids, 5), 8).float()

    out = tpcompile.generate(Echo(), torch.zeros(2, 3, dtype=torch.long), 10, eos_token_id=5)
    assert out.tolist() == [[0, 0, 0, 5], [0, 0, 0, 5]]
    with pytest.raises(ValueError, match="max_new_tokens"):
        tpcompile.generate(Echo(), torch.zeros(1, 1, dtype=torch.long), -1)


def test_a_block_runs_the_variant_its_parent_runs():
    """Under a root program made without sequence parallelism, a block never picks its
    sequence-parallel program, even where that one's guards would accept the call (an
    unsharded [b, T, d] read as a shard of a [b, 2T, d] sequence)."""
    import torch.utils._pytree as pytree

    from tpcompile.runtime import program as P

    x = torch.zeros(2, 7, 4)
    flat, spec = pytree.tree_flatten(((x,), {}))
    import sympy
    s = sympy.Symbol("s", positive=True, integer=True)

    def prog(sp: bool) -> P.Program:
        guard = P.Guard(0, (2, s, 4), {1: 2} if sp else {}, x.dtype)
        return P.Program(lambda *a: None, "", False, spec, {}, [guard], {}, 1, spec, [], [0],
                         divisible=[s] if sp else [], tp=2, sp=sp)

    block = P.Runtime(programs=[prog(True), prog(False)])
    for variant in (False, True):
        P._VARIANT.append(variant)
        try:
            found, _ = block.find(False, spec, flat)
        finally:
            P._VARIANT.pop()
        assert found is not None and found.sp is variant


def test_an_unsplittable_length_adds_only_the_program_without_sp(pool):
    """Planned at 8: length 10 adds the dynamic SP program; 11 then adds only the program
    without SP (the SP one is not traced again); 13 and 12 need nothing new."""
    for r in pool.run(J.programs_made, [10, 11, 13, 12]):
        assert r == [[True, True], [True, True, False], [True, True, False],
                     [True, True, False]], r


def test_a_config_with_use_cache_is_planned_without_a_cache(pool):
    """from_pretrained leaves use_cache=True in the config: the parallel model is planned
    without a KV cache and says so (it failed with an IndexError in the analysis of the
    cache's concatenation); training numbers are the unsharded model's;
    transformers' generate with a cache is refused by name, without one it gives the
    unsharded model's greedy tokens."""
    from tests.test_hf import check
    res = pool.run(J.with_use_cache)
    check([r["verdict"] for r in res], None)
    for r in res:
        assert len(r["said"]) == 1 and "use_cache=True" in r["said"][0], r["said"]
        assert r["cache"] == ("DynamicCache", None), r["cache"]
        assert "UnsupportedError" in r["refused"] and "use_cache=False" in r["refused"], r["refused"]
        assert r["got"] == r["want"] and len(r["got"][0]) == 8 + 5, (r["got"], r["want"])
        assert r["none_err"] < 1e-5 and r["none_cache"] is None, (r["none_err"], r["none_cache"])
