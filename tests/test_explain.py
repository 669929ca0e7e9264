"""explain's numbers against hand-computed values for the Llama debug config, and its
collective list against the collectives a real run issues (gloo)."""

from __future__ import annotations

import pytest
import torch

from models.llama2 import Transformer, config
from tests import jobs_plans
from tpcompile.cli.explain import Explanation, explain

TP, B, S = 2, 2, 8
A = config("debug")  # dim 64, 2 layers, 8 heads, 4 kv heads, vocab 512, ffn hidden 192
HIDDEN = 192
F32 = 4


@pytest.fixture(scope="module")
def exp() -> Explanation:
    with torch.device("meta"):
        m = Transformer(A)
    return explain(m, tp=TP, batch=B, seq=S)[0]


def rows(e: Explanation, module: str, phase: str) -> list[tuple[str, int]]:
    return sorted((c.kind, c.bytes) for c in e.collectives if c.module == module and c.phase == phase)


def test_block_collectives(exp):
    act = B * S * A.dim * F32  # one [b, s, dim] float32 activation
    fwd = [("all_gather", act)] * 2 + [("reduce_scatter", act)] * 2
    assert rows(exp, "layers.*", "forward") == sorted(fwd)
    norms = 2 * A.dim * F32  # attention_norm + ffn_norm weight gradients, one all-reduce
    assert rows(exp, "layers.*", "backward") == sorted(
        [("all_gather", act)] * 2 + [("reduce_scatter", act)] * 2 + [("all_reduce", norms)])
    assert all(c.count == A.n_layers for c in exp.collectives if c.module == "layers.*")


def test_root_collectives(exp):
    act, logits = B * S * A.dim * F32, B * S * A.vocab_size * F32
    assert rows(exp, "<root>", "forward") == sorted(
        [("reduce_scatter", act), ("all_gather", act), ("all_gather", logits)])
    assert rows(exp, "<root>", "backward") == sorted(
        [("all_gather", act), ("reduce_scatter", act), ("all_reduce", A.dim * F32)])


def test_wire_bytes_and_megatron_minimum(exp):
    act, frac = B * S * A.dim * F32, (TP - 1) / TP
    per_block = 8 * frac * act  # 4 AG/RS forward, 4 backward
    root = 4 * frac * act + frac * B * S * A.vocab_size * F32
    grads = 2 * frac * (A.dim + A.n_layers * 2 * A.dim) * F32
    assert exp.comm.total_wire_bytes == pytest.approx(A.n_layers * per_block + root + grads, abs=4)
    # Megatron: per segment one all-reduce forward and one backward; embedding one; head one
    ar = 2 * frac * act
    assert exp.comm.megatron_min_wire_bytes == pytest.approx(A.n_layers * 4 * ar + 2 * ar, abs=4)


def test_parameter_memory(exp):
    kv = A.dim // A.n_heads * A.n_kv_heads
    block = A.dim * A.dim * 2 + kv * A.dim * 2 + 3 * A.dim * HIDDEN
    sharded = A.n_layers * block + 2 * A.vocab_size * A.dim
    replicated = A.n_layers * 2 * A.dim + A.dim
    assert exp.memory.params_sharded_bytes == sharded // TP * F32
    assert exp.memory.params_replicated_bytes == replicated * F32
    assert exp.memory.params_total_bytes == (sharded + replicated) * F32
    assert exp.memory.activations_sp_bytes < exp.memory.activations_no_sp_bytes


def test_schema_round_trip(exp):
    assert Explanation.model_validate_json(exp.model_dump_json()) == exp
    assert exp.replicated == []


def test_predicted_collectives_match_a_real_run(pool, exp):
    """Every collective explain predicts, and no other, runs in forward+backward."""
    counted = pool.run(jobs_plans.counted_collectives, TP, B, S)[0]
    predicted = sorted((c.kind, c.bytes // F32) for c in exp.collectives for _ in range(c.count))
    assert counted == predicted


def test_parameter_memory_counts_shared_kv_heads_whole():
    """One kv head at tp 4: wk and wv are held whole on every rank (each rank slices its
    group's rows), so explain counts them replicated, as the placements are."""
    from models.llama2 import Transformer, config
    from tpcompile.cli.explain import param_memory
    from tpcompile.planning import compile_model
    model = Transformer(config("debug", n_kv_heads=1))
    sharded, replicated, total = param_memory(compile_model(model, tp=4), model, 1)
    kv = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
             if n.endswith(("attention.wk.weight", "attention.wv.weight")))
    whole = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "norm" in n)
    assert replicated == kv + whole, (replicated, kv, whole)
    assert sharded == (total - kv - whole) // 4


def test_layers_left_replicated_in_blocks_are_listed_once_each_and_warned_once():
    """gpt-fast under GQA keeps each block's wqkv and wo replicated. explain lists them
    once, named from the root with the block pattern (``layers.*.attention.wqkv``), not
    again per block as "not part of any segment"; and warns once per layer, though it
    plans twice (with and without sequence parallelism)."""
    import warnings
    from models import gpt_fast
    with torch.device("meta"):
        m = gpt_fast.build("tiny-gqa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = explain(m, tp=2, batch=2, seq=8)[0]
    assert sorted(r.layer for r in e.replicated) == ["layers.*.attention.wo",
                                                     "layers.*.attention.wqkv"], e.replicated
    assert "unequal parts [64, 16, 16]" in e.replicated[0].reason + e.replicated[1].reason
    said = sorted(str(w.message).split(" stays ")[0] for w in caught
                  if "stays replicated" in str(w.message))
    assert said == ["tpcompile: layers.0.attention.wo", "tpcompile: layers.0.attention.wqkv"], said


def test_parameters_read_in_slices_are_listed_in_their_block():
    """OLMo2 normalizes q and k over the whole sharded projection: each rank reads its
    slice of the replicated norm weights. The placement table lists them (it listed only
    layers with a style, so they were in no row), and the JSON round-trips them."""
    import warnings

    from models import hf_zoo
    from tpcompile.cli import render
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = explain(hf_zoo.build("olmo2"), tp=2, seq=16,
                    example_kwargs=hf_zoo.example_inputs("olmo2"))[0]
    rows = {(b.path, l.name): l.placements for b in e.blocks for l in b.sliced}
    assert rows == {(p, f"self_attn.{n}_norm"): {"weight": "Replicate (each rank reads its "
                                                  "slice; grad summed over tp)"}
                    for p in {b.path for b in e.blocks if b.sliced} for n in "qk"}, rows
    assert len({p for p, _ in rows}) == 1, rows  # the decoder layer's program
    assert "sliced      self_attn.q_norm" in render.text(e)
    assert Explanation.model_validate_json(e.model_dump_json()) == e


def test_experts_are_rows_of_their_block_and_counted_sharded():
    """Mixtral's 3-D expert Parameters are layers of their own: explain lists them in the
    MLP segment with their placements (per part on dim 1, rowwise on dim 2), counts their
    bytes as sharded, and the JSON round-trips the plan's layouts."""
    import warnings

    from models import hf_zoo
    from tpcompile.cli import render
    model = hf_zoo.build("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = explain(model, tp=2, seq=16, example_kwargs=hf_zoo.example_inputs("mixtral"))[0]
    rows = {l.name: (l.style, l.placements) for b in e.blocks for s in b.segments
            for l in s.layers if ".experts." in l.name}
    assert rows == {"mlp.experts.gate_up_proj": ("colwise", {"weight": "_StridedShard(dim=1, sf=2)"}),
                    "mlp.experts.down_proj": ("rowwise", {"weight": "Shard(dim=2)"})}, rows
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert e.memory.params_sharded_bytes >= experts // 2 * 4  # float32, halved over tp 2
    assert "mlp.experts.down_proj        rowwise" in render.text(e)
    assert Explanation.model_validate_json(e.model_dump_json()) == e
