"""Models this project did not write, as their authors wrote them: Hugging Face families
(tiny configs, built offline), a Llama in the reference implementation's style and a
GPT in nanoGPT's. Every rank's outputs and every gradient against the unsharded model.
"""

from __future__ import annotations

import pytest

from tests import jobs_hf as J

HELD_IN = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "bert"]
OTHERS = ["qwen3", "gemma2", "olmo2", "granite", "starcoder2", "gpt_neox", "falcon", "apertus",
          "gemma3", "phi", "opt", "gptj", "codegen"]
# share of parameters sharded at tp 2 the issue asks for (BERT: its position embeddings)
MIN_SHARDED = {"bert": 0.5}
# Apertus: its xIELU activation (``torch.min(x, eps)``, ``expm1``) between up and down
OTHERS_SHARDED = {"apertus": 0.99}


def check(results: list, min_sharded: float | None = 0.7) -> None:
    for per_rank in results:
        for r in per_rank if isinstance(per_rank, list) else [per_rank]:
            where = f"rank {r['rank']} {r.get('shape', '')}"
            assert not r["problems"], f"{where}: {r['problems']}"
            bad = {k: v for k, v in {**r["outputs"], **r["grads"]}.items() if not v <= J.TOL}
            assert not bad, f"{where}: errors above {J.TOL}: {bad}"
            assert r["grads"], f"{where}: no gradient compared"
            if min_sharded is not None:
                assert r["sharded"] >= min_sharded, f"{where}: only {r['sharded']:.0%} sharded"


@pytest.mark.parametrize("family", HELD_IN)
def test_held_in_family_matches_the_unsharded_model(pool, family):
    check(pool.run(J.numerics, family, 2, True), MIN_SHARDED.get(family, 0.7))


def test_phi3_with_gqa_keeps_attention_replicated_and_says_why(pool):
    """Phi-3-medium's layout: qkv_proj cut by slices into unequal parts (q twice k and v),
    which no DTensor placement holds per part: attention stays replicated (the MLP is
    sharded), the numbers are right, and the plan's notes say why."""
    res = pool.run(J.numerics, "phi3", 2, True, {"num_key_value_heads": 2})
    check(res, None)
    notes = " ".join(res[0][0]["notes"])
    assert "qkv_proj" in notes and "unequal parts" in notes, notes


def test_deepseek_v3_mla_keeps_attention_replicated_and_says_why(pool):
    """DeepSeek-V3's multi-head latent attention: kv_a_proj_with_mqa's output is split
    into a latent and a rope key of unequal sizes, which no placement holds per part, so
    the attention stays replicated, and the plan's notes say why; its dense first MLP is
    sharded, and the numbers are right."""
    res = pool.run(J.numerics, "deepseek_v3", 2, True)
    check(res, None)
    r = res[0][0]
    notes = " ".join(r["notes"])
    assert "kv_a_proj_with_mqa" in notes and "unequal parts" in notes, notes
    assert r["styles"]["model.layers.0.mlp.gate_proj"] == "colwise", r["styles"]


@pytest.mark.parametrize("family", ["llama_seq_cls", "bert_token_cls"])
def test_fine_tuning_heads(pool, family):
    """transformers' classifiers, as fine-tuning starts from them: a Llama that labels a
    sequence by its last token (whose forward sets ``config.problem_type`` on first use,
    in the config every block holds: planning once failed with a KeyError on the blocks'
    signatures) and a BERT that labels each token. Every gradient against the unsharded
    model, at the planned size and at another."""
    check(pool.run(J.numerics, family, 2, True, None, [(4, 8), (2, 12)]), 0.7)


def test_lora_adapters(pool):
    """LoRA as PEFT writes it around q_proj and v_proj, every other weight frozen: the
    base stays colwise, its low-rank up-projection lora_B is sharded with it (colwise) and
    lora_A replicated; the frozen weights get no gradient, the adapters the unsharded
    model's."""
    res = pool.run(J.numerics, "llama_lora", 2, True)
    check(res, None)
    styles = res[0][0]["styles"]
    for proj in ("q_proj", "v_proj"):
        at = f"model.layers.0.self_attn.{proj}"
        assert styles[f"{at}.base_layer"] == styles[f"{at}.lora_B"] == "colwise", styles
        assert f"{at}.lora_A" not in styles or styles[f"{at}.lora_A"] == "replicate", styles
    assert all(r["grads"] for rank in res for r in rank)


@pytest.mark.parametrize("family", OTHERS)
def test_other_family_matches_the_unsharded_model(pool, family):
    """Families not on the issue's list: right numbers always; sharding as it can."""
    check(pool.run(J.numerics, family, 2, True), OTHERS_SHARDED.get(family))


def test_per_head_qk_layernorm_keeps_attention_sharded(pool):
    """Persimmon (and Phi with qk_layernorm): an nn.LayerNorm over head_dim on q and k,
    sharded by heads. It normalizes each rank's own heads, so attention stays sharded (it
    was replicated, 59 %), and its weight and bias gradients, partial per rank, are summed
    over tp; every one checked on every rank."""
    res = pool.run(J.numerics, "persimmon", 2, True)
    check(res, 0.95)
    assert all(r[0]["notes"] == [] for r in res), res[0][0]["notes"]


@pytest.mark.parametrize("family, tp, sp, overrides, least", [
    ("olmo2", 2, False, {}, 0.99),
    # 2 kv heads at tp 4: k and v shared by pairs of ranks, k_norm's weight read by pairs
    ("olmo2", 4, False, {}, 0.9),
    ("olmo2_torch_norms", 4, True, {}, 0.9),  # torch's nn.RMSNorm: aten.rms_norm
    ("olmo_ai2", 2, True, {"layer_norm_type": "default"}, 0.98),  # F.layer_norm
    ("olmo_ai2", 2, True, {"layer_norm_type": "rms"}, 0.98),  # by hand: mean of squares
    ("olmo_ai2", 4, False, {"layer_norm_type": "by_hand"}, 0.98),  # by hand: x - mean
])
def test_norms_over_the_whole_projection_keep_attention_sharded(pool, family, tp, sp,
                                                                overrides, least):
    """OLMo 2 (and AI2's own OLMo code with attention_layer_norm) normalize q and k over
    the whole projection, every head at once. Each rank normalizes its slice of each row
    with the row's statistics summed over tp (a sum or mean over the sharded dim leaves
    each rank a term; the terms are all-reduced where first read, both ways when a sharded
    op reads them), and reads its slice of the norm's weight and bias, whose gradients are
    summed over tp. Attention stays sharded (OLMo 2 had 72 % sharded), with no notes; every
    gradient on every rank. AI2's code also clips the fused qkv in place (``clamp_``)
    before splitting it into q, k, v, each sharded per part."""
    res = pool.run(J.numerics, family, tp, sp, overrides, [(4, 8), (2, 6)])
    check(res, least)
    assert all(r[0]["notes"] == [] for r in res), res[0][0]["notes"]


@pytest.mark.parametrize("tp, sp, overrides", [(2, True, {}), (4, False, {}),
                                               (2, False, {"no_bias": False})])
def test_mpt_as_llm_foundry_writes_it(pool, tp, sp, overrides):
    """MosaicML's MPT as llm-foundry writes it (``models/mpt_foundry.py``): the output is
    the token embedding module called again, ``wte(x, unembed=True)`` =
    ``F.linear(x, self.weight)`` inside ``SharedEmbedding.forward``; the causal mask is
    made with ``scores.new_ones(s, s).tril()`` off the (head-sharded) scores; the fused
    Wqkv is clipped and cut by ``chunk(3)``; heads split by a view naming the head count;
    a LayerNorm run with autocast off; a logit scale. Everything is sharded: the head
    colwise on the embedding's vocab shards, attention by heads (``new_ones`` had no rule:
    attention stayed replicated), every gradient on every rank. Its norms run inside
    ``torch.autocast(enabled=False)``, one higher-order op in the trace, which sequence
    parallelism does not enter: with SP asked for, a warning says so, per module."""
    res = pool.run(J.numerics, "mpt_foundry", tp, sp, overrides, [(4, 8), (2, 6)])
    check(res, 0.99)
    assert all(r[0]["notes"] == [] for r in res), res[0][0]["notes"]
    for r in res:
        said = [w for w in r[0]["warnings"] if "torch.autocast region" in w]
        assert len(said) == (2 if sp else 0), r[0]["warnings"]  # the blocks, the root


@pytest.mark.parametrize("tp, sp", [(2, True), (4, False)])
def test_an_output_tied_by_f_linear_on_the_embedding_weight(pool, tp, sp):
    """AI2's OLMo ties its output as ``F.linear(x, self.transformer.wte.weight)`` in the
    root's forward (``weight_tying``, OLMo-1B's setting): no Linear module holds the
    weight. The read is a layer of its own, ``transformer.wte@linear``, colwise on the
    embedding's vocab shards (both Shard(0) of the one weight, its gradient the sum of
    both uses); it was named like the embedding, and both stayed replicated (90 % of
    this tiny model's parameters sharded, the check below asks 98 %)."""
    res = pool.run(J.numerics, "olmo_ai2", tp, sp, {"weight_tying": True}, [(4, 8), (2, 6)])
    check(res, 0.98)
    assert all(r[0]["notes"] == [] for r in res), res[0][0]["notes"]


@pytest.mark.parametrize("tp", [2, 4])
def test_cohere_per_head_norm_weights_are_read_by_heads(pool, tp):
    """Cohere (Command R+) normalizes q and k per head with one weight of [heads, head_dim]
    each, cast to float32 before use, beside a parallel residual: each rank reads its
    heads' rows of the cast weight (at tp 4 the 2 kv heads are shared by pairs of ranks,
    so each pair reads its head's row, the zero-padded gradient summed over tp). Attention
    stays sharded (it was replicated), no notes, no warnings."""
    res = pool.run(J.numerics, "cohere", tp, tp == 2)
    check(res, 0.85)
    for r in res:
        assert r[0]["notes"] == [] and r[0]["warnings"] == [], r[0]


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_oss_attention_sinks_keep_attention_sharded(pool, tp):
    """gpt-oss appends one learned logit per head (its sinks, a Parameter [H]) to the
    attention scores: ``cat([scores, sinks.reshape(1, -1, 1, 1).expand(b, -1, q, -1)])``.
    Made from a parameter alone, the expanded sinks are read split by heads like the
    scores, their gradient gathered; attention stays sharded (it was replicated). Its
    router is narrow: replicated, with a note (its experts: see
    ``test_moe_experts_are_sharded_like_linears``)."""
    res = pool.run(J.numerics, "gpt_oss", tp, tp == 2)
    check(res, None)
    for r in res:
        notes = [n for n in r[0]["notes"] if not n.startswith(("mlp.experts.", "mlp.router:"))]
        assert notes == [], notes


def test_falcon_linears_written_as_matmuls_are_sharded(pool):
    """transformers' FalconLinear computes ``x @ W.T``: planned as the Linear it is, so
    attention and MLP are sharded (it was 15 %, with no note saying why)."""
    check(pool.run(J.numerics, "falcon", 2, True), 0.95)


def test_blocks_that_return_more_than_hidden_states_are_traced_inline(pool):
    """BLOOM's blocks also return their attention weights ([B, H, S, S], shaped like no
    input): the parent traces them inline instead of refusing; the MLPs are sharded,
    attention stays replicated with the reason (its ALiBi baddbmm has no rule yet)."""
    res = pool.run(J.numerics, "bloom", 2, True)
    check(res, 0.5)
    notes = " ".join(res[0][0]["notes"])
    assert "baddbmm" in notes and "self_attention.query_key_value" in notes, notes


def test_blocks_traced_inline_plan_again_from_the_trace_cache():
    """Planning BLOOM a second time in one process replays the first trace from the cache:
    it replayed the request for a block that had been traced inline too, and raised the
    OpaqueBlockError the first planning had caught (found planning with and without SP).
    Both plannings warn the same, once per layer left replicated."""
    import warnings

    import tpcompile
    from models import hf_zoo
    from tpcompile.frontend import clear_cache
    clear_cache()
    styles, said = [], []
    for sp in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = tpcompile.plan(hf_zoo.build("bloom"), tp=2, sequence_parallel=sp,
                               example_kwargs=hf_zoo.example_inputs("bloom"))
        styles.append({k: v for k, v in p.layer_styles().items() if v != "sequence_parallel"})
        said.append(sorted(str(w.message) for w in caught if "stays" in str(w.message)))
    assert styles[0] == styles[1] and "colwise" in styles[0].values(), styles
    # the warnings of the first planning's block analysis, abandoned when the parent traced
    # the block inline, were said too (with names relative to the block): one per note
    assert said[0] == said[1] and said[0], said
    assert all(w.startswith("tpcompile: transformer.h.") for w in said[0]), said[0]


EXPERTS = {("gate_up_proj", "_S(1, 2)"), ("down_proj", "S(2)")}
# gpt-oss: [E, in, out] read as stored, gate and up interleaved (gate_up[..., ::2] and
# [..., 1::2]) in blocks that stay whole per rank, a bias per expert added in place
# (gate_up's read in slices, down's after the reduction)
EXPERTS_IO = {("gate_up_proj", "S(2)"), ("down_proj", "S(1)"), ("gate_up_proj_bias", "R"),
              ("down_proj_bias", "R")}


@pytest.mark.parametrize("family, tp, sp", [("mixtral", 2, True), ("mixtral", 4, False),
                                            ("qwen2_moe", 2, False), ("qwen3_moe", 2, True),
                                            ("olmoe", 2, False), ("granitemoe", 2, True),
                                            ("gpt_oss", 2, True), ("gpt_oss", 4, False)])
def test_moe_experts_are_sharded_like_linears(pool, family, tp, sp):
    """transformers 5's experts: 3-D Parameters [E, out, in] read transposed by a grouped
    matmul (``grouped_mm_fallback`` on the CPU), no Linear. ``gate_up_proj`` is colwise per
    part (its output is chunked into gate | up: each rank holds its slice of both, on dim
    1), ``down_proj`` rowwise (dim 2), its partial sums all-reduced. They were replicated
    (Mixtral: 10 % of the parameters sharded at tp 2). Judged by tpcompile's own judge on
    every rank: each shard against its slice of the reference under the plan's placement,
    every gradient with its placement, the outputs. Qwen2-MoE also has a shared expert
    (plain Linears) beside them; OLMoE q/k norms over the whole projections; GraniteMoE
    its experts under ``block_sparse_moe`` and scaled residuals; gpt-oss (replicated
    before) its own layout and biases."""
    for r in pool.run(J.judged, family, tp, sp):
        assert not r["verdict"], r["verdict"]
        experts = {n.rsplit(".", 1)[1]: pl for n, pl in r["placements"].items()
                   if ".experts." in n}
        want = EXPERTS_IO if family == "gpt_oss" else EXPERTS
        assert set(experts.items()) == want, experts
        assert not [n for n in r["notes"] if "experts" in n], r["notes"]


@pytest.mark.parametrize("tp", [2, 4])
def test_alibi_built_in_forward_is_read_split_by_heads(pool, tp):
    """MPT (transformers) builds its ALiBi bias in forward from ``arange`` and per-head
    slopes, then adds it to the head-sharded scores: made from no input and no
    parameter, each rank reads its heads' slice of it, and attention stays sharded (it
    was replicated: 69 % of the parameters sharded at tp 2)."""
    res = pool.run(J.numerics, "mpt", tp, tp == 2)
    check(res, 0.95)
    assert all(r[0]["notes"] == [] for r in res), res[0][0]["notes"]


def test_moe_experts_under_fsdp_dp2_tp2(pool):
    """Mixtral's experts sharded over tp on their feature dims, and by FSDP2 over dp on
    the experts' dim."""
    check(pool.run(J.fsdp_numerics, "mixtral"), 0.95)


@pytest.mark.parametrize("family, router", [("mixtral", "mlp.gate"), ("qwen2_moe", "mlp.gate"),
                                            ("gpt_oss", "mlp.router")])
def test_moe_routers_stay_replicated(family, router):
    """A router (hidden -> a few experts) whose scores a softmax or top-k reads whole was
    sharded by columns and gathered at the layer: a gather of [tokens, experts] forward and
    an all-reduce of [tokens, hidden] backward per block, to split a weight of experts x
    hidden. It stays replicated, with a note saying why; the vocabulary head, which
    the same rule keeps sharded (out_features >> in_features), still is."""
    import warnings

    import tpcompile
    from models import hf_zoo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = tpcompile.plan(hf_zoo.build(family), tp=2,
                           example_kwargs=hf_zoo.example_inputs(family))
    styles = p.layer_styles()
    routers = [k for k in styles if k.endswith(router) or f"{router}." in k]
    assert not routers, styles
    assert styles.get("lm_head") == "colwise", styles
    notes = [n.reason for n in p.notes() if n.layer.endswith(router)]
    assert notes and all(n == "replicated: its output is read whole inside the model, and "
                         "out_features 4 < in_features 64: gathering its output forward and "
                         "all-reducing its input gradient backward would cost more than "
                         "splitting its weight saves" for n in notes), notes


def test_moe_with_a_one_wide_shared_expert_gate(pool):
    """Qwen2-MoE: ``mlp.shared_expert_gate`` (out_features 1) sits beside the shared
    expert ``mlp.shared_expert.*`` and the router ``mlp.gate``. It is a layer of its own,
    kept replicated with a note naming it alone (a gate 1 wide is too narrow to pay for
    its collectives); the shared expert and attention stay sharded (it was taken as part
    of their segments by name prefix: IndivisibleError)."""
    res = pool.run(J.numerics, "qwen2_moe", 2, True)
    check(res, 0.5)
    for r in res:
        gate = [n for n in r[0]["notes"] if "shared_expert_gate" in n]
        assert len(gate) == 1 and gate[0].startswith(
            "mlp.shared_expert_gate: replicated: its output is read whole inside the model, "
            "and out_features 1 < in_features 64"), r[0]["notes"]


@pytest.mark.parametrize("family", ["reference_llama", "nanogpt", "gpt_fast"])
@pytest.mark.parametrize("tp", [2, 4])
def test_reference_style_code(pool, family, tp):
    # the tiny reference config has 2 kv heads: at tp 4 each is shared by 2 ranks.
    # nanoGPT (fused c_attn per part, tied wte/lm_head) leaves only norms and wpe whole;
    # gpt-fast's fused wqkv (split into three equal parts without GQA) is sharded per part
    check(pool.run(J.numerics, family, tp, True), 0.95 if family != "reference_llama" else 0.7)


@pytest.mark.parametrize("family", ["vit", "vit_reg"])
def test_timm_style_vit(pool, family):
    """timm's ViT: the fused qkv cut by ``reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    .unbind(0)`` is sharded per part (each rank its heads of q, of k and of v), proj
    rowwise, the MLP and the 10-class head too (the patch Conv2d, the class and position
    embeddings stay whole, with notes). Batch 4 as planned, then 3 (a second program).
    17 tokens cannot be split over tp 2: sequence parallelism was asked for, so the plan
    warns, and each call runs the program without it; 18 tokens (a register token) run
    with it."""
    res = pool.run(J.numerics, family, 2, True, None, [(4, 8), (3, 8)])
    check(res, 0.85)
    for rank in res:
        notes = [n.split(":")[0] for n in rank[0]["notes"]]
        assert sorted(notes) == ["cls_token", "patch_embed.proj.weight", "pos_embed"] + \
            (["reg_token"] if family == "vit_reg" else []), rank[0]["notes"]
        said = [w for w in rank[0]["warnings"] if "sequence_parallel=True" in w]
        if family == "vit":
            assert len(said) == 1 and "size 17 along the dim sequence parallelism splits" in said[0]
            # the planned (SP) program never fits; the first call adds one without SP,
            # dynamic in the batch, which serves the second call too
            assert [r["programs"] for r in rank] == [2, 2], rank
        else:
            assert said == [] and [r["programs"] for r in rank] == [1, 2], rank


def test_gpt_fast_with_gqa_keeps_attention_replicated_and_says_why(pool):
    """gpt-fast under GQA: ``wqkv`` split into [dim, kv, kv], unequal parts no DTensor
    placement holds per part. Attention stays replicated, the numbers are right, and the
    notes name the parts, and ``wo``'s cause (its input comes from the replicated wqkv),
    not the residual add its colwise attempt met."""
    res = pool.run(J.numerics, "gpt_fast_gqa", 2, True)
    check(res, None)
    for r in res:
        notes = dict(n.split(": ", 1) for n in r[0]["notes"])
        assert set(notes) == {"attention.wqkv", "attention.wo"}, notes
        assert "unequal parts [64, 16, 16]" in notes["attention.wqkv"], notes
        assert notes["attention.wo"].startswith(
            "replicated: its input comes from attention.wqkv, which stays replicated"), notes
        assert 0.5 < r[0]["sharded"] < 0.95, r[0]["sharded"]  # MLP, embedding and head


def test_llama_other_shapes_and_without_sequence_parallel(pool):
    """Planned at (4, 8); run at other batch sizes and lengths (13 and 5 are not divisible
    by tp: the program without sequence parallelism). The first program is specialised to
    the planned shapes; the first call at another shape makes one dynamic program, which
    serves every shape after (torch.compile's automatic dynamic shapes)."""
    res = pool.run(J.numerics, "llama", 2, False, None, [(4, 8), (2, 13), (3, 5), (4, 8)])
    check(res)
    for rank in res:
        assert [r["programs"] for r in rank] == [1, 2, 2, 2]


def test_llama_with_a_padding_mask(pool):
    check(pool.run(J.numerics, "llama", 2, True, None, [(4, 8)], True))


@pytest.mark.parametrize("family", ["llama", "gpt2", "reference_llama", "nanogpt"])
def test_fsdp_dp2_tp2(pool, family):
    # fused projections are sharded per part on tp and on dim 1 over dp (their biases
    # replicated over dp, gradients averaged there), as in test_hf's 1-D runs
    check(pool.run(J.fsdp_numerics, family))


def per_block(pool, family: str, tp: int, sp: bool) -> dict:
    """Collectives of one block: counts(3 layers) - counts(2 layers)."""
    two = pool.run(J.collective_counts, family, tp, sp, 2)[0]
    three = pool.run(J.collective_counts, family, tp, sp, 3)[0]
    out = {}
    for phase in ("fwd", "bwd", "fwd_bytes", "bwd_bytes"):
        out[phase] = {k: three[phase].get(k, 0) - two[phase].get(k, 0)
                      for k in set(two[phase]) | set(three[phase])
                      if three[phase].get(k, 0) - two[phase].get(k, 0)}
    return out


@pytest.mark.parametrize("family", ["llama", "reference_llama"])
def test_comm_per_block_is_the_megatron_minimum(pool, family):
    """HF's rotate_half RoPE and the reference's complex RoPE add no collective."""
    act = 4 * 8 * 64 * 4  # batch x seq x hidden x float32 (bytes of a full activation)
    c = per_block(pool, family, 2, True)
    assert c["fwd"] == {"all_gather": 2, "reduce_scatter": 2}
    assert c["bwd"] == {"all_gather": 2, "reduce_scatter": 2, "all_reduce": 1}
    # an all-gather's input is one shard, a reduce-scatter's the whole partial tensor
    assert c["fwd_bytes"] == {"all_gather": act, "reduce_scatter": 2 * act}
    c = per_block(pool, family, 2, False)
    assert c["fwd"] == {"all_reduce": 2} and c["bwd"] == {"all_reduce": 2}


def test_experts_reduce_per_token_not_per_expert_row(pool):
    """Mixtral's experts (top 2) compute on rows of (token, expert) pairs. The down
    projection's partial sums are weighted, put back in token order and summed over the
    two experts before the all-reduce, and the input gradient of gate_up is summed over tp
    per token, before the rows were picked: each all-reduce is [tokens, hidden], not
    [2 x tokens, hidden] (that was the bytes at the layer). The routing weights, which
    scale partial sums now, get their gradient summed too: [2 x tokens, 1]."""
    act = 4 * 8 * 64 * 4  # batch x seq x hidden x float32
    c = per_block(pool, "mixtral", 2, False)
    assert c["fwd"] == {"all_reduce": 2} and c["fwd_bytes"] == {"all_reduce": 2 * act}, c
    assert c["bwd"] == {"all_reduce": 3}, c  # attention's input, the experts', the weights'
    assert c["bwd_bytes"] == {"all_reduce": 2 * act + 2 * 4 * 8 * 4}, c


def test_an_op_without_a_rule_keeps_its_segment_replicated(pool):
    for r in pool.run(J.no_rule):
        check([r], None)
        said = [w for w in r["warnings"] if "tpcompile_test.scale" in w]
        assert said and "layers.0" in said[0] and "jobs_hf.py:" in said[0], r["warnings"]
        assert "layers.0.wq" not in r["styles"] and r["styles"]["layers.0.w1"] == "colwise"
        # the MLP's all-reduce, forward and backward, in each of the two blocks: nothing
        # gathers around the custom op
        assert r["collectives"] == {"all_reduce": 2 * 2}, r["collectives"]


def test_optional_arguments_and_modes(pool):
    check(pool.run(J.optional_args), None)


def test_inputs_embeds_with_a_tied_head(pool):
    """Tied embeddings, called with inputs_embeds after planning on ids: the embedding is
    not called but its weight is read by the head, colwise on the weight's vocab shards
    (once refused: the plan's vocab_parallel embedding was never called)."""
    res = pool.run(J.embeds_tied)
    check(res, None)
    assert res[0]["styles"]["lm_head"] == "colwise", res[0]["styles"]


def test_a_model_already_made_dtensor_is_refused(pool):
    for r in pool.run(J.already_parallel):
        assert r["error"] == "UnsupportedError" and "parallelize_module" in r["message"]
        assert "model.layers.0.mlp.gate_proj.weight" in r["message"] and r["untouched"]


def test_no_grad_inside_forward_keeps_its_meaning(pool):
    for r in pool.run(J.no_grad_region):
        assert r["no_grad_kept"], "a layer used under no_grad got a gradient"
        check([r], None)
        assert r["styles"]["w1"] == "colwise" and r["styles"]["w2"] == "rowwise"


def test_every_aten_op_of_the_families_has_a_rule():
    """The op table states what happens to every ATen op the held-in families and the
    reference-style models contain (a rule, or replicated-only)."""
    import operator

    import torch

    from tpcompile.analysis import ops
    missing = {}
    for family in HELD_IN + ["reference_llama", "nanogpt"]:
        model, args, kwargs = J.build(family)
        ep = torch.export.export(model, args, kwargs, strict=False)
        targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
        lacking = sorted(str(t) for t in targets if t is not operator.getitem and not ops.has_rule(t))
        if lacking:
            missing[family] = lacking
    assert not missing, missing


@pytest.mark.parametrize("family,tp", [("llama", 2), ("phi3", 2), ("gpt2", 4)])
def test_load_state_dict_takes_full_tensors(pool, family, tp):
    """``par.load_state_dict(full_state_dict)``, as on the unsharded model (it failed with
    DTensor's "mixed torch.Tensor and DTensor"): each rank cuts its shards from the full
    tensors, fused projections (Phi-3's qkv and gate_up, GPT-2's c_attn) and a tied head
    (GPT-2) included. Then the parallel model is judged against the model the state came
    from, on every rank: outputs, every shard, every gradient with its placement. The
    caller's dict is left as it was; a wrong shape gets torch's size-mismatch error."""
    for r in pool.run(J.load_full, family, tp):
        assert not r["verdict"], r["verdict"]
        assert r["loaded"] == "<All keys matched successfully>", r["loaded"]
        assert r["untouched"] and r["differs"], r
        assert "size mismatch for " + r["sharded"] in r["mismatch"], r["mismatch"]


def test_outputs_transformers_captures_with_hooks(pool):
    """transformers 5 collects attention weights, router logits and hidden states with
    forward hooks it installs for good at the first call asking for them. A model that
    has them (called once with output_attentions and output_hidden_states) is
    parallelized (it was refused: "has hooks"), serves hidden states (judged: all 3, the
    logits, every gradient) and attention weights (judged: both maps; they were collected
    inside the blocks' programs and came back missing, then were refused), then serves
    plain calls; a config flag set after planning (output_hidden_states) is refused, not
    ignored."""
    for r in pool.run(J.captured_outputs):
        assert r["hooked"] >= 4, r["hooked"]  # 2 decoder layers + 2 attention modules
        hidden, attentions = r["verdicts"]["output_hidden_states"], r["verdicts"]["output_attentions"]
        check([hidden, attentions])
        assert len([k for k in hidden["outputs"] if "hidden_states" in k]) == 3, hidden
        assert len([k for k in attentions["outputs"] if "attentions" in k]) == 2, attentions
        assert r["hidden_states"] == 3
        assert r["plain"] <= J.TOL, r["plain"]
        assert r["config_after"] is not None, r  # config flag set after: refused, not ignored
        assert "output_hidden_states: False -> True" in r["config_after"][1], r["config_after"]
        assert r["given"] <= J.TOL and r["pad_set"] <= J.TOL, r  # not refused: the call gives
        # it; a value the model does not read (a causal LM's pad token) may change


@pytest.mark.parametrize("family, overrides, flag", [
    ("llama", {"attn_implementation": "eager"}, "output_attentions"),
    ("mixtral", {}, "output_router_logits")])
def test_planned_with_outputs_inside_then_called_without(pool, family, overrides, flag):
    """Planned on a call asking for outputs collected inside the decoder layers (computed
    inline in the root's program), then called without: the decoder layers get programs
    of their own that read their parameters as the root's plan sharded them (they read
    them as replicated: wrong numbers, in silence; found by review). Both calls judged."""
    for r in pool.run(J.planned_inline_then_plain, family, overrides, flag):
        check(r["verdicts"], None)
        assert r["programs"] == 2, r["programs"]


@pytest.mark.parametrize("family, sp", [("mixtral", True), ("qwen3_moe", False)])
def test_moe_router_logits_and_aux_loss(pool, family, sp):
    """output_router_logits=True (in the config, as MoE fine-tuning sets it): transformers
    collects each router's logits with a hook inside the decoder layer, and the model adds
    its load-balancing aux_loss to the loss. Those calls trace the decoder layers inline, so
    the logits, the aux loss and its gradient into every router are judged against the
    unsharded model, at two lengths. (It failed tracing on an empty tuple, then was
    refused.)"""
    res = pool.run(J.numerics, family, 2, sp, {"output_router_logits": True}, [(4, 8), (2, 6)])
    check(res, 0.9)
    for per_rank in res:
        for r in per_rank:
            keys = set(r["outputs"])
            assert "['aux_loss']" in keys and "['router_logits'][1]" in keys, keys


def test_router_logits_layers_are_not_blocks(pool):
    """Checkpointing and router logits: the decoder layers computed inline are not blocks,
    which is refused (asked for) or said (transformers' own; a later call), not ignored."""
    for r in pool.run(J.per_block_lost):
        assert r["asked"] is not None and r["asked"][0] == "CheckpointingError", r
        assert "output_router_logits" in r["asked"][1] and "model.layers.0" in r["asked"][1], r
        assert r["said_hf"] and "model.layers.0" in r["said_hf"][0], r
        assert r["said_late"] and "model.layers.0" in r["said_late"][0], r


def test_moe_router_logits_under_fsdp_dp2_tp2(pool):
    """The same on dp 2 x tp 2, the decoder layers computed inline in the root's program
    (and FSDP2's root unit). A model planned without them, whose decoder layers are FSDP2's
    units, refuses a later call asking for them (the layers' FSDP2 hooks would not run
    inline: it failed on shapes), naming the layer and the fix."""
    check(pool.run(J.fsdp_numerics, "mixtral", {"output_router_logits": True}), 0.9)
    for r in pool.run(J.router_logits_later_under_fsdp):  # planned without: refused, named
        assert r["later"] is not None and r["later"][0] == "UnsupportedError", r
        assert "model.layers.0" in r["later"][1] and "output_router_logits" in r["later"][1], r
        assert r["plain"] <= J.TOL, r
