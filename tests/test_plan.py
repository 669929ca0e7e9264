"""Planning: no process group, no real weights. Detection comes from dataflow."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpcompile
from models.llama2 import Transformer, config
from models.toy import GatedMLPStack, ToyModel


def megatron_llama_plan(n_layers: int) -> dict[str, str]:
    """The hand-written Megatron / torchtitan Llama plan, as layer -> style."""
    plan = {"tok_embeddings": "vocab_parallel", "norm": "sequence_parallel",
            "output": "colwise"}
    for i in range(n_layers):
        for name in ("attention.wq", "attention.wk", "attention.wv",
                     "feed_forward.w1", "feed_forward.w3"):
            plan[f"layers.{i}.{name}"] = "colwise"
        for name in ("attention.wo", "feed_forward.w2"):
            plan[f"layers.{i}.{name}"] = "rowwise"
        for name in ("attention_norm", "ffn_norm"):
            plan[f"layers.{i}.{name}"] = "sequence_parallel"
    return dict(sorted(plan.items()))


def test_llama_plan_is_the_megatron_plan():
    p = tpcompile.plan(Transformer(config("debug")), tp=2)
    assert p.layer_styles() == megatron_llama_plan(2)
    block = p.module_for("layers.0")
    assert block is not None and block.path == "layers.*"
    assert [s.kind for s in block.segments] == ["attention", "gated_mlp"]
    assert block.inputs[0] == "Q" and block.output == "Q"  # blocks exchange seq shards


def test_llama_plan_without_sequence_parallel():
    p = tpcompile.plan(Transformer(config("debug")), tp=2, sequence_parallel=False)
    expected = {k: v for k, v in megatron_llama_plan(2).items() if v != "sequence_parallel"}
    assert p.layer_styles() == expected


def test_repeated_blocks_are_analysed_once():
    with torch.device("meta"):
        model = Transformer(config("debug", n_layers=12))
    p = tpcompile.plan(model, tp=2)
    assert len(p.modules) == 2  # the root and one group for all 12 blocks
    assert p.modules[1].members == [f"layers.{i}" for i in range(12)]


def test_meta_model_plans_like_a_real_one():
    real = tpcompile.plan(Transformer(config("debug")), tp=4)
    with torch.device("meta"):
        meta = tpcompile.plan(Transformer(config("debug")), tp=4)
    assert real == meta


def test_7b_meta_plan():
    with torch.device("meta"):
        model = Transformer(config("7B"))
    p = tpcompile.plan(model, tp=8)
    assert p.layer_styles() == megatron_llama_plan(32)


def test_toy_model_plan():
    p = tpcompile.plan(ToyModel(), tp=2, example_inputs=(torch.randn(4, 10),))
    assert p.layer_styles() == {"in_proj": "colwise", "out_proj": "rowwise"}
    assert p.modules[0].segments[0].kind == "mlp"


def test_gated_stack_plan():
    p = tpcompile.plan(GatedMLPStack(), tp=2)
    s = p.layer_styles()
    assert s["layers.2.mlp.w1"] == s["layers.2.mlp.w3"] == "colwise"
    assert s["layers.2.mlp.w2"] == "rowwise"
    assert s["layers.2.norm"] == s["norm"] == "sequence_parallel"


class ExplicitAttention(nn.Module):
    """q @ k^T -> softmax -> @ v, heads split with view/transpose, a biased projection."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.norm = nn.RMSNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=True) for _ in range(3))
        self.o = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(h).view(b, s, self.heads, self.hd).transpose(1, 2)
        v = self.v(h).view(b, s, -1, self.hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        y = att.softmax(dim=-1) @ v
        return x + self.o(y.transpose(1, 2).reshape(b, s, -1))


def test_explicit_softmax_attention():
    p = tpcompile.plan(ExplicitAttention(), tp=2, example_inputs=(torch.randn(2, 4, 32),))
    assert p.layer_styles() == {"q": "colwise", "k": "colwise", "v": "colwise",
                                "o": "rowwise", "norm": "sequence_parallel"}
    assert p.modules[0].segments[0].kind == "attention"


@pytest.mark.parametrize("act", [F.relu, F.gelu, F.silu, torch.tanh, nn.GELU("tanh")])
def test_mlp_activations(act):
    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), act, nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    p = tpcompile.plan(MLP(), tp=2, example_inputs=(torch.randn(2, 8),))
    assert p.layer_styles() == {"fc1": "colwise", "fc2": "rowwise"}


class Unsafe(nn.Module):
    """The hidden activation is scaled by its largest feature: a max over the sharded dim,
    which shards would get wrong (a sum or mean there is summed over tp; a max is not);
    the analysis must leave it replicated and say why."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h / h.amax(-1, keepdim=True))


def test_unsafe_structure_stays_replicated_with_reason():
    p = tpcompile.plan(Unsafe(), tp=2, example_inputs=(torch.randn(2, 8),))
    # fc1 stays replicated; fc2, the last layer, may still become a colwise head
    assert "fc1" not in p.layer_styles()
    reasons = " ".join(n.reason for n in p.notes())
    assert "fc1" in " ".join(n.layer for n in p.notes()) and "sharded dim" in reasons


def test_fused_qkv_is_sharded_per_part():
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(x).split(16, dim=-1)
            return self.o(F.scaled_dot_product_attention(
                q.unflatten(-1, (4, 4)).transpose(1, 2), k.unflatten(-1, (4, 4)).transpose(1, 2),
                v.unflatten(-1, (4, 4)).transpose(1, 2)).transpose(1, 2).flatten(-2))

    from tpcompile.planning import compile_model
    c = compile_model(Fused(), tp=2, example_inputs=(torch.randn(2, 4, 16),))
    assert c.plan.layer_styles()["qkv"] == "colwise"
    # a plain Shard(0) would mix q, k, v: each rank holds its slice of each of the three
    # parts (_StridedShard(0, split_factor=3); numerics in tests/test_hf.py, nanoGPT)
    assert c.units[0].prop.packed == {"qkv": 3}


class _EncoderLM(nn.Module):
    """nn.TransformerEncoder as PyTorch's own tutorials build a language model with it."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.enc(self.emb(ids), mask=mask, is_causal=True))


def test_stock_multihead_attention_is_planned_by_heads_or_says_why_not():
    """nn.TransformerEncoder's attention is sharded by heads (packed in_proj per part,
    out_proj rowwise; numerics in tests/test_shapes.py). An nn.MultiheadAttention asked
    for its weights (need_weights=True: heads averaged in a batched matmul) stays
    replicated, named in a warning and the plan's notes, never silently."""
    p = tpcompile.plan(_EncoderLM(), tp=2, example_inputs=(torch.randint(0, 64, (2, 8)),))
    styles = p.layer_styles()
    assert styles["enc.layers.1.self_attn.in_proj"] == "colwise"
    assert styles["enc.layers.1.self_attn.out_proj"] == "rowwise"
    packed = {k: v for m in p.modules for k, v in m.packed.items()}
    assert packed["enc.layers.0.self_attn.in_proj"] == 3, packed

    class Weights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

        def forward(self, x):
            y, w = self.attn(x, x, x)  # need_weights defaults to True
            return self.mlp(y) + w.sum()

    with pytest.warns(UserWarning, match=r"attn stays replicated: this nn\.MultiheadAttention "
                                         r"is sharded by heads only"):
        p = tpcompile.plan(Weights(), tp=2, example_inputs=(torch.randn(2, 8, 16),))
    assert "attn" in {n.layer for n in p.notes()}
    assert "attn.in_proj" not in p.layer_styles()

def test_a_materialised_meta_model_is_traced_on_its_new_device():
    """A meta-built model materialised by auto_parallelize lives on the mesh's device; a
    later re-plan (a call at another shape) must fake its parameters there, not on meta,
    where they would meet the call's CUDA inputs (found on a GPU: 'found two different
    devices meta, cuda:0'). The skeleton records the new devices."""
    from tpcompile.frontend import follow_devices, skeleton
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    sk = skeleton(model)
    assert {d.type for d in sk.__dict__["_tpcompile_devices"].values()} == {"meta"}
    model.to_empty(device="cpu")
    follow_devices(sk, model)
    assert {d.type for d in sk.__dict__["_tpcompile_devices"].values()} == {"cpu"}


class _MatmulLinear(nn.Linear):
    """A Linear written as a matmul, as transformers' FalconLinear is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T if self.bias is None else x @ self.weight.T + self.bias


class _MatmulMLP(nn.Module):
    def __init__(self, d: int = 32, bias: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up, self.down = _MatmulLinear(d, 4 * d, bias=bias), _MatmulLinear(4 * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


@pytest.mark.parametrize("bias", [False, True])
def test_a_linear_written_as_a_matmul_is_a_layer(bias):
    """``x @ w.T (+ b)`` on a Linear's own weight is planned as that Linear: the MLP is
    colwise/rowwise as with nn.Linear (numerics: Falcon in tests/test_hf.py)."""
    x = torch.randn(2, 8, 32)

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([_MatmulMLP(bias=bias) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    styles = tpcompile.plan(Stack(), tp=2, example_inputs=(x,)).layer_styles()
    assert styles.get("layers.0.up") == "colwise" and styles.get("layers.0.down") == "rowwise", styles


def test_timm_vit_heads_tp_does_not_divide_are_refused_like_separate_qkv():
    """ViT-Ti's layout (3 heads) at tp 2: the fused qkv's heads cannot be split, so the
    same IndivisibleError as for separate q/k/v Linears, naming the reshape's heads dim;
    on_indivisible='replicate' keeps attention whole and shards the MLP."""
    from models import vit
    m = vit.build("tiny", embed_dim=48, num_heads=3)
    kw = vit.example_inputs("tiny")
    with pytest.raises(tpcompile.IndivisibleError, match=r"heads \(dim 3 of reshape to "
                       r"\[2, 17, 3, 3, 16\]\) = 3 is not divisible by tp = 2"):
        tpcompile.plan(m, tp=2, example_kwargs=kw)
    with pytest.warns(UserWarning, match="not divisible by tp = 2"):
        p = tpcompile.plan(m, tp=2, example_kwargs=kw, on_indivisible="replicate")
    styles = p.layer_styles()
    assert "blocks.0.attn.qkv" not in styles and styles["blocks.0.mlp.fc1"] == "colwise"


class _BranchOnLength(nn.Module):
    """An MLP whose code branches on the length: a dynamic export of it holds for the
    lengths on its side of the branch only (its guards say which)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(F.gelu(h) if x.shape[1] > 6 else F.relu(h))


class _StackOfBranches(nn.Module):
    """The branching MLP as the blocks of a stack (each traced on its own): the parent's
    trace holds for every length, each block's for its side of the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_BranchOnLength(), _BranchOnLength()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("stack", [False, True])
def test_a_dynamic_trace_serves_the_sizes_its_guards_admit_and_no_others(monkeypatch, stack):
    """A dynamic trace (what a call at a new size plans with) is remembered for every
    size its guards admit: planning again at another batch and length exports nothing.
    A length on the other side of the model's branch, or a batch of one (export
    specialises 0 and 1), is traced anew, and gets the other branch's graph. In a stack
    the parent's trace serves every length, and replays its blocks' requests at the new
    sizes: each block's own trace decides (a replay at the traced sizes gave the block
    the wrong branch's graph)."""
    import importlib

    from tpcompile.frontend import clear_cache
    from tpcompile.planning.build import compile_model
    T = importlib.import_module("tpcompile.frontend.trace")  # (the package's trace is a function)
    exports = []
    real = T._export
    monkeypatch.setattr(T, "_export", lambda *a, **k: exports.append(1) or real(*a, **k))
    clear_cache()
    model = _StackOfBranches() if stack else _BranchOnLength()

    def graph(batch: int, seq: int) -> tuple[int, set[str]]:
        before = len(exports)
        c = compile_model(model, tp=2, example_inputs=(torch.randn(batch, seq, 8),), dynamic=True)
        ops = {str(n.target) for u in c.units for n in u.t.gm.graph.nodes if n.op == "call_function"}
        return len(exports) - before, {op for op in ops if "gelu" in op or "relu" in op}

    first = 3 if stack else 1  # the stack: the parent (stopped at its block), the block, the parent
    assert graph(2, 8) == (first, {"aten.gelu.default"})
    assert graph(3, 12) == (0, {"aten.gelu.default"})  # the same traces, no export
    assert graph(2, 4) == (1, {"aten.relu.default"})  # outside the guards: traced again
    assert graph(4, 5) == (0, {"aten.relu.default"})  # ... and that one remembered too
    assert graph(3, 9) == (0, {"aten.gelu.default"})
    assert graph(1, 8) == (first, {"aten.gelu.default"})  # a batch of one: traces of its own
    clear_cache()


def test_a_dynamic_trace_keeps_the_conditions_beyond_ranges():
    """A trace made where batch x length <= 64 has each size's range [2, inf) and the
    product's condition only in torch.export's guard code: it must not serve 16 x 128
    (the other branch), neither from the trace cache nor as a program (whose check reads
    the same conditions)."""
    from tpcompile.frontend import clear_cache
    from tpcompile.planning.build import compile_model
    from tpcompile.frontend.guards import broken_condition, guards_for, shape_mismatch
    from tests.jobs_shapes import BranchOnRows
    clear_cache()
    model = BranchOnRows()

    def traced(batch: int, seq: int) -> tuple[Any, set[str]]:
        c = compile_model(model, tp=2, example_inputs=(torch.randn(batch, seq, 8),), dynamic=True)
        t = c.units[0].t
        return t, {str(n.target) for n in t.gm.graph.nodes if "elu" in str(n.target)}

    small, ops = traced(4, 8)
    assert ops == {"aten.relu.default"} and small.conditions, small.ep._guards_code
    assert traced(16, 128)[1] == {"aten.gelu.default"}
    assert traced(3, 5) == (small, {"aten.relu.default"})  # inside all of them: remembered
    guards = guards_for(small.inputs, small.positions, {}, 1)
    for shape, fits in (((16, 128, 8), False), ((3, 20, 8), True)):
        x = [torch.empty(shape)]
        why = shape_mismatch(guards, small.ranges, x, {}) or broken_condition(small.conditions, guards, x)
        assert (why is None) == fits and (fits or "<= 64" in why), (shape, why)
    clear_cache()


class _Scaled:
    """An activation held as a plain object (not a module): it counts by identity."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


def test_a_signature_never_matches_a_new_object_at_a_dead_ones_address(monkeypatch):
    """Block signatures (the trace cache's keys) hold an attribute no plain value stands
    for by identity. A bare ``id`` matched a new object that CPython put at the address of
    a collected one, so a remembered trace of one model served another. (The reused
    address is made certain here: every ``_Scaled`` gets the same id.)"""
    import gc
    import importlib

    from tpcompile.frontend.blocks import block_signature
    blocks = importlib.import_module("tpcompile.frontend.blocks")
    monkeypatch.setattr(blocks, "id", lambda o: 0xADD7E55 if isinstance(o, _Scaled) else id(o),
                        raising=False)
    m = nn.Linear(4, 4)
    m.act = _Scaled(2.0)  # callable: by identity, whatever its settings
    first = block_signature(m)
    assert first == block_signature(m)  # the same living object: equal
    other = nn.Linear(4, 4)
    other.act = _Scaled(2.0)  # alive at "the same address": still another object
    assert block_signature(other) != first
    m.act = other.act = None
    gc.collect()
    m.act = _Scaled(2.0)  # the first one is gone; a new one at its address
    assert block_signature(m) != first
