"""Plan files: round trips, the flat and full forms, HF tp_plan interop, and a table of
malformed plans, each with the clear error it must give. Planning needs no processes;
the parallelize_module and auto_parallelize(plan=...) checks run on the gloo pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

import tpcompile
from models.llama2 import Transformer, config
from models.toy import GatedMLPStack, ToyModel
from tests import jobs_plans
from tests.test_numerics import check
from tpcompile import Plan, PlanError
from tpcompile.planning import compile_model
from tpcompile.planning.bind import glob_regex
from tpcompile.planning import (from_hf_tp_plan, from_yaml, load, loads, save, to_hf_tp_plan,
                                to_parallelize_plan, to_yaml)

ROOT = Path(__file__).resolve().parent.parent
HF_LLAMA = {
    "embed_tokens": "embedding_rowwise",
    "layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise", "layers.*.input_layernorm": "sequence_parallel",
    "norm": "sequence_parallel", "lm_head": "colwise_rep",
}


def llama(**kw) -> Transformer:
    with torch.device("meta"):
        return Transformer(config("debug", **kw))


@pytest.fixture(scope="module")
def detected() -> Plan:
    return tpcompile.plan(llama(), tp=2)


def test_yaml_and_json_round_trip(detected, tmp_path):
    assert from_yaml(to_yaml(detected)) == detected
    for name in ("p.yaml", "p.json"):
        assert load(save(detected, tmp_path / name)) == detected


def test_detected_plan_applied_gives_the_same_plan(detected):
    assert compile_model(llama(), tp=2, given=detected).plan == detected


def test_block_glob_covers_a_deeper_model(detected):
    """A plan made on 2 blocks (path layers.*) applies to 4."""
    styles = compile_model(llama(n_layers=4), tp=2, given=detected).plan.layer_styles()
    assert styles["layers.3.attention.wo"] == "rowwise"
    assert styles["layers.3.ffn_norm"] == "sequence_parallel"


def test_flat_plan_equals_detected(detected):
    flat = loads("tok_embeddings: vocab_parallel\n"
                 "layers.*.attention.wq: colwise\n"
                 "layers.*.attention.wk: colwise\nlayers.*.attention.wv: colwise\n"
                 "layers.*.attention.wo: rowwise\nlayers.*.feed_forward.w1: colwise\n"
                 "layers.*.feed_forward.w3: colwise\nlayers.**.w2: rowwise\noutput: colwise\n")
    got = compile_model(llama(), tp=2, given=flat).plan
    assert got.layer_styles() == detected.layer_styles()


def test_exact_name_overrides_glob():
    flat = loads("'in_pro*': colwise\nout_proj: rowwise\nin_proj: replicate\n")
    with pytest.raises(PlanError, match="out_proj: rowwise layer fed by a tensor that is not sharded"):
        compile_model(ToyModel(), tp=2, given=flat)


@pytest.mark.parametrize("pattern,name,hit", [
    ("layers.*.attention.wq", "layers.12.attention.wq", True),
    ("layers.*.attention.wq", "layers.1.sub.attention.wq", False),
    ("layers.**.wq", "layers.1.sub.attention.wq", True),
    ("*.w1", "mlp.w1", True), ("*.w1", "w1", False), ("mlp.w*", "mlp.w12", True),
])
def test_glob(pattern, name, hit):
    assert bool(glob_regex(pattern).match(name)) == hit


def test_hf_round_trip():
    assert to_hf_tp_plan(from_hf_tp_plan(HF_LLAMA)) == HF_LLAMA


def test_detected_plan_through_hf(detected):
    hf = to_hf_tp_plan(detected)
    assert hf["output"] == "colwise_rep" and hf["tok_embeddings"] == "embedding_rowwise"
    assert hf["layers.*.attention.wo"] == "rowwise"
    back = compile_model(llama(), tp=2, given=from_hf_tp_plan(hf)).plan
    assert back.layer_styles() == detected.layer_styles()


def test_parallelize_plan_styles(detected):
    d = to_parallelize_plan(detected)
    assert list(d) == sorted(d)
    assert isinstance(d["layers.*.attention.wq"], ColwiseParallel)
    assert d["layers.*.attention.wq"].input_layouts == (Shard(1),)
    wo = d["layers.*.attention.wo"]
    assert isinstance(wo, RowwiseParallel) and wo.output_layouts == (Shard(1),)
    assert isinstance(d["layers.*.ffn_norm"], SequenceParallel)
    assert d["output"].output_layouts == (Replicate(),)
    assert isinstance(d["tok_embeddings"], RowwiseParallel)
    no_sp = tpcompile.to_parallelize_plan(tpcompile.plan(llama(), tp=2, sequence_parallel=False))
    assert no_sp["layers.*.attention.wo"].output_layouts == (Replicate(),)


def test_parallelize_plan_refuses_sp_from_model_inputs():
    with pytest.raises(PlanError, match="sequence_parallel=False"):
        tpcompile.to_parallelize_plan(tpcompile.plan(GatedMLPStack(), tp=2))


# (model, plan text, fragments the error must contain)
MALFORMED = [
    ("llama", "layers.0.attention.wz: colwise", ["layers.0.attention.wz", "does not have",
                                                 "nearest: ", "layers.0.attention.w"]),
    ("llama", "layers.*.atention.wq: colwise", ["matches no layer", "layers.*.attention.wq"]),
    ("llama", "tok_embeddings: rowwise", ["tok_embeddings", "is Embedding", "vocab_parallel"]),
    ("llama", "layers.*.attention_norm: colwise", ["layers.0.attention_norm", "is RMSNorm",
                                                   "sequence_parallel or replicate"]),
    ("llama", "output: vocab_parallel", ["output", "is Linear", "colwise"]),
    ("llama", "layers.*.attention.wq: sequence_parallel", ["not a norm"]),
    ("llama", "layers.0.attention: colwise", ["container", "wq, wk, wv, wo"]),
    ("llama", "layers.*.attention.wq: colwse", ["unknown style 'colwse'", "did you mean 'colwise'"]),
    ("llama", "layers.0.feed_forward.w1: colwise", ["layers.1 and layers.0 are identical blocks",
                                                    "feed_forward.w1"]),
    ("llama", "layers.*.feed_forward.w2: rowwise", [
        "layers.0", "feed_forward.w2: rowwise layer fed by a tensor that is not sharded",
        "wrong numbers"]),
    ("llama", "layers.*.attention.wq: colwise\nlayers.*.attention.wo: rowwise",
     ["attention needs", "sharded on heads"]),
    ("llama", "layers.*.attention.wq: colwise\nlayers.**.wq: replicate", ["make them agree"]),
    ("llama", "tp: 2\nmodules: []\nbogus: 1", ["bogus: unknown field"]),
    ("llama", "modules: []", ["tp: required field missing"]),
    ("llama", "- a\n- b", ["a plan is a mapping"]),
    ("llama", "a: [b", ["not valid YAML"]),
    ("toy", "in_proj: colwise\nout_proj: rowwise", ["out_features = 32 not divisible by tp = 3"]),
]


@pytest.mark.parametrize("model,text,fragments", MALFORMED, ids=[t for _, t, _ in MALFORMED])
def test_malformed_plan(model, text, fragments):
    m, tp = (llama(), 2) if model == "llama" else (ToyModel(), 3)
    with pytest.raises(PlanError) as err:
        compile_model(m, tp=tp, given=loads(text))
    for f in fragments:
        assert f in str(err.value), f"{f!r} not in: {err.value}"


@pytest.mark.parametrize("fmt,text", [
    ("yaml", "layers.*.attention.wq: colwise\nlayers.*.attention.wo: rowwise\n"
             "layers.*.attention.wq: replicate\n"),
    ("json", '{"layers.*.attention.wq": "colwise", "layers.*.attention.wq": "replicate"}'),
])
def test_a_layer_listed_twice_is_refused(fmt, text):
    with pytest.raises(PlanError, match="'layers.*.attention.wq' is given twice"):
        loads(text, fmt)


def test_full_plan_for_another_tp_or_model_is_refused(detected):
    written = tpcompile.plan(llama(), tp=4)
    with pytest.raises(PlanError, match="written for tp = 4, but the mesh has tp = 2"):
        compile_model(llama(), tp=2, given=written)
    with pytest.raises(PlanError, match="written for a Transformer, not a ToyModel"):
        compile_model(ToyModel(), tp=4, given=written)
    flat = loads("layers.*.attention.wq: colwise\nlayers.*.attention.wk: colwise\n"
                 "layers.*.attention.wv: colwise\nlayers.*.attention.wo: rowwise\n")
    for tp in (2, 4):  # a flat plan carries no tp: the mesh decides
        assert compile_model(llama(), tp=tp, given=flat).plan.tp == tp


def test_unsupported_hf_style():
    with pytest.raises(PlanError, match="'gather' has no tpcompile equivalent"):
        from_hf_tp_plan({"lm_head": "gather"})


def test_missing_file_and_suffix(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    (tmp_path / "p.txt").write_text("x: colwise")
    with pytest.raises(PlanError, match="suffix"):
        load(tmp_path / "p.txt")


# ---------------------------------------------------------------- on the gloo pool

@pytest.mark.parametrize("name,sp", [("llama", True), ("llama", False), ("gated", False),
                                     ("gpt_positions", True), ("gpt_positions", False)])
def test_parallelize_module_matches_rewrite(pool, name, sp):
    """gpt_positions: a learned position table looked up by arange(T) gives [T, d]; under
    sequence parallelism its output is reduce-scattered on dim 0 to meet the tokens'
    [B, T/tp, d]."""
    res = pool.run(jobs_plans.parallelize_module_matches, name, 2, sp)
    check(res)
    for r in res:
        assert r["vs_ours"].ok, r["vs_ours"].describe()
        assert r["sharded"], "parallelize_module sharded nothing"


def test_auto_parallelize_with_plan_file(pool):
    res = pool.run(jobs_plans.given_plan, "llama", 2, str(ROOT / "plans/llama2-debug.yaml"))
    check(res)
    assert res[0]["styles"]["layers.1.feed_forward.w2"] == "rowwise"


def test_auto_parallelize_refuses_wrong_plan(pool, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers.*.feed_forward.w2: rowwise\n")
    res = pool.run(jobs_plans.refused_plan, "llama", 2, str(bad))
    for r in res:
        assert r["error"] == "PlanError" and "wrong numbers" in r["message"]
        assert r["unchanged"] and r["forward_kept"]


def test_parallelize_plan_refuses_a_fused_projection():
    """nanoGPT's c_attn is sharded per part (q, k, v); ColwiseParallel would split it
    contiguously and compute wrong numbers, so the conversion says so instead."""
    from tests.jobs_plans import build as build_plans
    model, (idx,) = build_plans("nanogpt")
    plan = tpcompile.plan(model, tp=2, example_inputs=(idx,))
    with pytest.raises(PlanError, match=r"transformer\.h\.\*\.attn\.c_attn \(3 parts\).*ColwiseParallel"):
        tpcompile.to_parallelize_plan(plan)
    with pytest.raises(PlanError, match=r"c_attn \(3 parts\).*Hugging Face 'colwise'"):
        tpcompile.to_hf_tp_plan(plan)
