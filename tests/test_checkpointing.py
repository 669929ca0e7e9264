"""``auto_parallelize(..., activation_checkpointing=...)``: blocks run under
``torch.utils.checkpoint``; forward keeps less, backward runs the blocks' forward again
(their collectives included), and every number stays the unsharded model's."""

from __future__ import annotations

import pytest

from tests import jobs_checkpointing as J
from tests.test_fsdp import _check_training
from tests.test_hf import check


@pytest.mark.parametrize("sp", [False, True])
def test_every_block_checkpointed_matches_the_unsharded_model(pool, sp):
    """HF Llama at tp 2, every block checkpointed: outputs and every gradient equal the
    unsharded model's on every rank; forward keeps under half the bytes it keeps without
    checkpointing; backward runs each block's forward again up to its last saved tensor
    (torch's early stop): its collectives but the MLP's output reduction, which nothing
    after it in the block keeps (1 all-reduce per block without SP; with SP 2 all-gathers
    and 1 reduce-scatter)."""
    for r in pool.run(J.numerics, "llama", 2, sp, "block"):
        check([r])
        assert r["wrapped"] == ["model.layers.0", "model.layers.1"], r["wrapped"]
        assert r["saved"]["ckpt"] < 0.5 * r["saved"]["plain"], r["saved"]
        plain, ckpt = r["backward"]["plain"], r["backward"]["ckpt"]
        extra = {k: ckpt.get(k, 0) - plain.get(k, 0) for k in set(plain) | set(ckpt)}
        want = {"all_gather": 2, "reduce_scatter": 1} if sp else {"all_reduce": 1}
        assert {k: v for k, v in extra.items() if v} == \
            {k: v * r["layers"] for k, v in want.items()}, (plain, ckpt)


def test_first_k_blocks_checkpointed(pool):
    """``activation_checkpointing=1`` (a suggestion's ``checkpoint_blocks``) wraps the
    first block only; the numbers stay right."""
    for r in pool.run(J.numerics, "llama", 2, True, 1):
        check([r])
        assert r["wrapped"] == ["model.layers.0"], r["wrapped"]
        assert r["saved"]["ckpt"] < r["saved"]["plain"], r["saved"]


def test_transformers_gradient_checkpointing_is_done_the_parallel_way(pool):
    """A fine-tuning script's ``model.gradient_checkpointing_enable()`` before
    auto_parallelize: the layers it names are checkpointed around their programs (its own
    wrapper sits in the class forward the parallel model no longer runs, and its
    input-grads hook sits on an embedding computed inline: once refused as a hook that
    would not run), its flags and hook are gone, forward keeps under half the bytes, and
    the numbers are the unsharded model's."""
    for r in pool.run(J.numerics, "llama", 2, True, None, {}):
        check([r])
        assert r["wrapped"] == ["model.layers.0", "model.layers.1"], r["wrapped"]
        assert r["flags"] == [] and r["hooks"] == 0, (r["flags"], r["hooks"])
        assert r["saved"]["ckpt"] < 0.5 * r["saved"]["plain"], r["saved"]


def test_transformers_checkpointing_tpcompile_cannot_match_is_refused(pool):
    """Every second layer (every_n_layers=2), offloaded activations, or a contradicting
    activation_checkpointing: a CheckpointingError naming the fix; the model as it was.
    Turned on after auto_parallelize (the Trainer's way): the call is refused, saying to
    turn it on before."""
    for r in pool.run(J.transformers_refused):
        for case, words in (("every_2", "every_n_layers"), ("offload", "offload"),
                            ("contradicted", "disagrees")):
            assert r[case] is not None, f"{case}: accepted"
            kind, message, untouched = r[case]
            assert kind == "CheckpointingError" and words in message and untouched, r[case]
        assert r["after"] is not None and r["after"][0] == "UnsupportedError", r["after"]
        assert "after auto_parallelize" in r["after"][1] and "Trainer" in r["after"][1], r["after"]


def test_recompute_draws_the_forward_dropout_masks(pool):
    """Dropout inside sharded regions draws from each tp rank's own stream: the
    recompute must replay it. Loss and every gradient of the checkpointed model equal
    the plain parallel model's over two training steps (the masks differ per rank and
    step, so a replay from the wrong state shows as a gradient difference)."""
    for r in pool.run(J.dropout_replayed):
        assert r["dropped"], "train mode must run dropout"
        assert r["losses"][0] == r["losses"][1], r["losses"]
        worst = max(r["grad_diff"].values())
        assert worst <= 1e-6, sorted(r["grad_diff"].items(), key=lambda kv: -kv[1])[:3]


def test_checkpointing_under_fsdp(pool):
    """dp 2 x tp 2, every block checkpointed and FSDP-sharded: three AdamW steps equal
    the single-process model (outputs, every gradient, the parameters after)."""
    _check_training(pool.run(J.on_fsdp))


def test_checkpointing_with_compile(pool):
    """compile=... and checkpointing on a 1-D mesh: the blocks are compiled one by one and
    the checkpoint wraps each compiled forward."""
    for r in pool.run(J.compiled):
        check([r])
        assert r["compiled_inside"] == ["model.layers.0", "model.layers.1"], r


def test_settings_that_name_no_blocks_are_refused(pool):
    res = pool.run(J.bad_settings)[0]
    for setting, got in res.items():
        assert got is not None, f"activation_checkpointing={setting} was accepted"
        name, message, untouched = got
        assert name == "CheckpointingError", got
        assert "LlamaForCausalLM has 2 blocks" in message and "'block'" in message, message
        assert untouched, f"{setting}: the model was changed"


def test_recompute_runs_the_variant_its_forward_ran(pool):
    """A 7-token sequence under a plan with SP runs the program without it; the
    checkpointed blocks' recompute runs that one too (no root program runs in backward
    to say which)."""
    for r in pool.run(J.unsplittable_length):
        check([r])
        assert False in r["variants"] and True in r["variants"], r["variants"]
