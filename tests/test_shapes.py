"""Layer shapes of real models: sparse experts, a small indivisible head, fused
projections and per-head norms, with the redundant compute counted (tests/jobs_shapes.py).

Redundant compute: tp x (matmul and attention FLOPs of one forward and backward on one
rank) / the unsharded model's, with torch.utils.flop_counter; 1.0 is a perfect 1/tp
share. What stays replicated (norms, a router, rotary tables) costs no matmul FLOPs
except the replicated layers themselves."""

from __future__ import annotations

import pytest

from tests import jobs_shapes as J
from tests.harness import assert_numerics
from tests.test_numerics import check as matches


def _same_on_every_rank(res: list[dict], key: str):
    assert all(r[key] == res[0][key] for r in res), [r[key] for r in res]
    return res[0][key]


@pytest.mark.parametrize("tp", [2, 4])
def test_moe_experts_are_tensor_parallel_inside(pool, tp):
    """Mixtral-style MoE, top-2 of 4 experts dispatched with torch.where (data-dependent
    token counts): every expert's w1/w3 colwise and w2 rowwise, the router replicated
    with its reason, numbers equal on every rank."""
    res = pool.run(J.case, "moe", tp, True)
    matches(res)
    styles = res[0]["styles"]
    for layer in range(2):
        for e in range(4):
            pre = f"layers.{layer}.block_sparse_moe.experts.{e}"
            assert (styles[f"{pre}.w1"], styles[f"{pre}.w3"], styles[f"{pre}.w2"]) == (
                "colwise", "colwise", "rowwise")
        assert f"layers.{layer}.block_sparse_moe.gate" not in styles
    assert any("gate" in layer and "read whole inside the model" in why
               for layer, why in res[0]["notes"].items())
    assert min(r["sharded"] for r in res) >= 0.7
    assert max(r["flop_ratio"] for r in res) <= 1.02, [r["flop_ratio"] for r in res]


def test_a_lone_indivisible_head_is_replicated_with_a_warning(pool):
    """A 7-class head at tp 2 is a segment of one layer: it stays replicated with a
    warning naming it and the numbers, instead of failing the whole model; the blocks
    are sharded as usual."""
    res = pool.run(J.case, "classifier", 2, True)
    matches(res)
    styles = res[0]["styles"]
    assert "head" not in styles
    assert styles["blocks.0.1"] == "colwise" and styles["blocks.0.3"] == "rowwise"
    said = [w for w in res[0]["warnings"] if "head" in w]
    assert said and "7" in said[0] and "tp = 2" in said[0], res[0]["warnings"]


@pytest.mark.parametrize("name,tp", [("nanogpt", 2), ("gpt2", 2), ("phi3", 2), ("qwen3", 2),
                                     ("llama", 2)])
def test_redundant_compute_is_within_two_percent(pool, name, tp):
    """Fused qkv (nanoGPT's c_attn, GPT-2's Conv1D, Phi-3's qkv_proj and gate_up_proj),
    per-head q/k norms (Qwen3) and plain GQA (Llama): each rank does its 1/tp share of
    the matmuls, numbers equal."""
    res = pool.run(J.case, name, tp, True)
    matches(res)
    assert max(r["flop_ratio"] for r in res) <= 1.02, [r["flop_ratio"] for r in res]


@pytest.mark.parametrize("name", ["llama", "reference_llama"])
def test_fewer_kv_heads_than_tp_are_shared_by_groups_of_ranks(pool, name):
    """2 kv heads at tp 4 (the HF Llama's sdpa path and the reference Llama's repeat_kv):
    each kv head is computed by the 2 ranks whose q heads use it, from a replicated
    weight whose gradient is summed over tp; numbers equal on every rank, the q/o and
    MLP matmuls still split 4 ways (the kv projections are computed twice)."""
    res = pool.run(J.case, name, 4, True)
    matches(res)
    k = "model.layers.0.self_attn.k_proj" if name == "llama" else "layers.0.attention.wk"
    for r in res:
        assert r["grouped"][k] == 2, r["grouped"]
        assert r["placements"][f"{k}.weight"] == "R", r["placements"]
    # the one redundancy: each kv projection computed on 2 ranks, + its share of the FLOPs
    # (Llama-3-70B at tp 16 with 8 kv heads: + 2 %)
    for r in res:
        assert r["flop_ratio"] <= 1.02 + r["kv_share"], (r["flop_ratio"], r["kv_share"])


@pytest.mark.parametrize("name,tp", [("mha", 2), ("mha_seq_first", 4), ("encoder_pre", 4),
                                     ("encoder_post", 2)])
def test_stock_pytorch_attention_is_sharded_by_heads(pool, name, tp):
    """nn.MultiheadAttention (batch first and sequence first, a boolean causal mask,
    need_weights=False) and nn.TransformerEncoder (pre- and post-norm): the packed
    in_proj_weight is sharded per part (each rank its slice of q, of k and of v), the
    heads folded into the batch ([T, B * H, hd]) stay this rank's heads, out_proj is
    rowwise; numbers equal on every rank with sequence parallelism, every matmul split."""
    res = pool.run(J.case, name, tp, True)
    matches(res)
    attn = "blocks.0.attn" if name.startswith("mha") else "encoder.layers.0.self_attn"
    styles = res[0]["styles"]
    assert (styles[f"{attn}.in_proj"], styles[f"{attn}.out_proj"]) == ("colwise", "rowwise")
    for r in res:
        assert r["placements"][f"{attn}.in_proj_weight"] == "_S(0, 3)", \
            r["placements"]
        assert not r["warnings"], r["warnings"]
    assert min(r["sharded"] for r in res) >= 0.7
    assert max(r["flop_ratio"] for r in res) <= 1.02, [r["flop_ratio"] for r in res]


# Hugging Face models without sequence parallelism: their rotary tables are computed at
# the root from inputs_embeds.shape[1], which parallelize_module's sequence-sharded
# embedding output would halve (tpcompile's rewrite keeps the logical length)
EXPRESSIBLE = [("moe", False), ("classifier", False), ("llama", False)]
REFUSED = [("nanogpt", 2, "c_attn (3 parts)"), ("gpt2", 2, "c_attn (3 parts)"),
           ("phi3", 2, "qkv_proj (3 parts)"), ("mha", 2, "attn.in_proj (3 parts)"),
           ("reference_llama", 4, "wk (2 heads at tp 4)"),
           ("qwen3", 2, "self_attn.k_norm.weight, model.layers.*.self_attn.q_norm.weight")]


@pytest.mark.parametrize("name,sp", EXPRESSIBLE)
def test_exported_plan_runs_under_parallelize_module(pool, name, sp):
    """Experts (each one's w1/w3 colwise, w2 rowwise), a replicated 7-class head, GQA
    with kv heads dividing tp: the plan as a
    parallelize_module dict runs and gives the unsharded model's numbers."""
    res = pool.run(J.interop, name, 2, sp)
    assert all(r["refused"] is None for r in res), res[0]["refused"]
    matches(res)


@pytest.mark.parametrize("name,tp,what", REFUSED)
def test_exported_plan_says_what_it_cannot_express(pool, name, tp, what):
    """Fused projections sharded per part, kv heads shared by groups of ranks and
    per-head norms (a replicated weight whose gradient must be summed over tp; with
    parallelize_module the ranks' copies drift apart, which a run of the exported plan
    showed) have no parallelize_module style: the conversion names the layers instead of
    emitting a plan that computes wrong numbers."""
    res = pool.run(J.interop, name, tp, False)
    said = res[0]["refused"]
    assert said and what in said and "auto_parallelize" in said, said


def test_per_head_norms_in_a_hugging_face_tp_plan():
    """Qwen3's q/k norms become what transformers' own Qwen3 plan calls them
    ('replicated_with_grad_allreduce'), and that style reads back as replicate."""
    import tpcompile
    from transformers import Qwen3Config
    model, args, kwargs = J.build("qwen3")
    hf = tpcompile.to_hf_tp_plan(tpcompile.plan(model, tp=2, example_inputs=args,
                                                example_kwargs=kwargs))
    theirs = Qwen3Config.base_model_tp_plan
    for norm in ("q_norm", "k_norm"):
        assert hf[f"model.layers.*.self_attn.{norm}"] == theirs[f"layers.*.self_attn.{norm}"]
    back = tpcompile.from_hf_tp_plan({"layers.*.self_attn.q_norm": "replicated_with_grad_allreduce"})
    assert back.layer_styles() == {"layers.*.self_attn.q_norm": "replicate"}


def test_norms_over_a_sharded_projection_are_no_style_of_other_tools():
    """OLMo 2's q/k norms read their weight in slices and sum their row statistics over
    tp; a parallelize_module or Hugging Face plan would hand the norm each rank's local
    slice, normalized on its own: both conversions refuse, naming the weights."""
    import tpcompile
    from tpcompile.errors import PlanError
    model, args, kwargs = J.build("olmo2")
    plan = tpcompile.plan(model, tp=2, example_inputs=args, example_kwargs=kwargs)
    assert plan.module_for("model.layers.0").sliced == ["self_attn.k_norm.weight",
                                                         "self_attn.q_norm.weight"]
    for convert in (tpcompile.to_hf_tp_plan, tpcompile.to_parallelize_plan):
        with pytest.raises(PlanError, match=r"self_attn\.q_norm\.weight.*no style") as e:
            convert(plan)
        assert "auto_parallelize" in str(e.value)


@pytest.mark.parametrize("family", ["mpt_foundry", "olmo_ai2"])
def test_an_output_head_made_of_the_embedding_weight_is_no_style_of_other_tools(family):
    """MPT's ``wte(x, unembed=True)`` and AI2 OLMo's ``F.linear(x, wte.weight)`` are no
    module: tpcompile shards them as ``transformer.wte@linear``; the conversions refuse
    the name (a parallelize_module key that names no module fails, or styles nothing)."""
    import tpcompile
    from tpcompile.errors import PlanError
    model, args, kwargs = J.build(family, **({"weight_tying": True} if family == "olmo_ai2"
                                             else {}))
    plan = tpcompile.plan(model, tp=2, example_inputs=args, example_kwargs=kwargs)
    assert plan.layer_styles()["transformer.wte@linear"] == "colwise"
    # the plan given back (a saved plan, auto_parallelize(plan=...)) binds to the model
    from tpcompile.planning.build import compile_model
    again = compile_model(model, tp=2, example_inputs=args, example_kwargs=kwargs, given=plan)
    assert again.plan.layer_styles() == plan.layer_styles()
    for convert in (tpcompile.to_hf_tp_plan, tpcompile.to_parallelize_plan):
        with pytest.raises(PlanError, match=r"^transformer\.wte@linear: .*F\.linear") as e:
            convert(plan)
        assert "auto_parallelize" in str(e.value)


def test_experts_plan_saved_and_given_back_and_refused_by_other_tools(tmp_path):
    """A plan naming Mixtral's expert Parameters (``mlp.experts.gate_up_proj``, no
    module) binds to the model again from a saved file, with the same layouts (its
    embedding has a padding_idx, which the check of a given plan refused, though the
    rewrite keeps it: no saved plan of such a model could be given back); the
    conversions to parallelize_module and Hugging Face's tp_plan refuse them (a style keyed
    by module name cannot reach a Parameter)."""
    import warnings

    import tpcompile
    from models import hf_zoo
    from tpcompile.errors import PlanError
    from tpcompile.planning import files
    from tpcompile.planning.build import compile_model
    model, kwargs = hf_zoo.build("mixtral"), hf_zoo.example_inputs("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpcompile.plan(model, tp=2, example_kwargs=kwargs)
        given = files.load(files.save(plan, tmp_path / "plan.yaml"))
        again = compile_model(model, tp=2, example_kwargs=kwargs, given=given)
    styles = plan.layer_styles()
    assert styles["model.layers.1.mlp.experts.gate_up_proj"] == "colwise", styles
    assert styles["model.layers.1.mlp.experts.down_proj"] == "rowwise", styles
    assert again.plan.layer_styles() == styles
    assert [m.experts for m in again.plan.modules] == [m.experts for m in plan.modules]
    for convert in (tpcompile.to_hf_tp_plan, tpcompile.to_parallelize_plan):
        with pytest.raises(PlanError, match=r"mlp\.experts\.down_proj.*grouped matmul") as e:
            convert(plan)
        assert "auto_parallelize" in str(e.value)
    # experts a given plan keeps replicated are no such layer: the conversions take it
    kept = plan.model_copy(update={"modules": [m.model_copy(update={"styles": {
        k: "replicate" if ".experts." in k else v for k, v in m.styles.items()}})
        for m in plan.modules]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = compile_model(model, tp=2, example_kwargs=kwargs, given=kept).plan
    assert all(not m.experts for m in whole.modules), [m.experts for m in whole.modules]
    assert "model.layers.0.mlp.experts.down_proj" not in tpcompile.to_parallelize_plan(whole)


@pytest.mark.parametrize("kind", ["product", "longest"])
def test_a_program_serves_only_the_sizes_its_traced_code_decided_for(pool, kind):
    """The program made at 3 x 6 took the branch of batch x length <= 64 (``longest``:
    max(batch, length) <= 10); at 16 x 16 (4 x 16) the model takes the other one. Each
    size's range admits it, the condition on both sizes does not: it gets a program of its
    own, and every call matches the unsharded model (the 3 x 6 program once served it,
    with the other branch's numbers; ``longest`` until its condition's ``max`` was read)."""
    res = pool.run(J.branch_on_rows, 2, kind)
    for i in range(4):
        assert_numerics([r[i] for r in res], context=f"call {i}")
    assert [r["programs"] for r in res[0]] == [1, 2, 3, 3]
