"""Bad input: a clear TPCompileError naming the layer, the numbers and the fix; or the
announced fallback with correct numbers; and the user's model untouched after a failure."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tpcompile
from models.toy import GatedMLPStack
from tests import jobs
from tests.test_numerics import check


def test_indivisible_error_names_layer_and_numbers(pool):
    res = pool.run(jobs.indivisible, 4, "error")
    for r in res:
        assert r["error"] == "IndivisibleError"
        msg = r["message"]
        assert "layers.0.mlp.w1" in msg and "6" in msg and "tp = 4" in msg, msg
        assert "on_indivisible='replicate'" in msg
        assert r["untouched"] and r["out_same"]


def test_indivisible_fallback_replicates_with_correct_numbers(pool):
    res = pool.run(jobs.indivisible, 4, "replicate")
    check(res)
    styles = res[0]["styles"]
    assert not any(v in ("colwise", "rowwise") for k, v in styles.items() if ".mlp." in k)


def test_indivisible_plan_warns_and_records_note():
    with pytest.warns(UserWarning, match="not divisible by tp = 4"):
        p = tpcompile.plan(GatedMLPStack(hidden=6), tp=4, on_indivisible="replicate")
    notes = p.notes()
    assert notes and all("not divisible" in n.reason for n in notes)


def test_bad_on_indivisible_value():
    with pytest.raises(ValueError, match="on_indivisible"):
        tpcompile.plan(GatedMLPStack(), tp=2, on_indivisible="ignore")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if h.sum() > 0:  # control flow on a tensor value: not traceable
            h = h.relu()
        return self.down(h)


def test_untraceable_names_construct_and_place():
    with pytest.raises(tpcompile.TraceError) as e:
        tpcompile.plan(DataDependent(), tp=2, example_inputs=(torch.randn(2, 8),))
    msg = str(e.value)
    assert "DataDependent" in msg and "test_errors.py" in msg and "h.sum() > 0" in msg


def test_errors_are_tpcompile_errors():
    for cls in (tpcompile.TraceError, tpcompile.IndivisibleError, tpcompile.PlanError,
                tpcompile.UnsupportedError, tpcompile.RuntimeShapeError):
        assert issubclass(cls, tpcompile.TPCompileError)


def test_kv_heads_neither_dividing_nor_divided_by_tp_are_refused_clearly():
    """3 kv heads at tp 4: no group of ranks can share a head (3 does not divide 4) and
    no head count per rank is whole; 1 kv head (multi-query) at tp 4 is shared by all."""
    from models.llama2 import Transformer, config
    odd = dict(dim=48, n_heads=12, n_kv_heads=3)
    with pytest.raises(tpcompile.IndivisibleError) as e:
        tpcompile.plan(Transformer(config("debug", **odd)), tp=4)
    said = str(e.value)
    assert "layers.0.attention" in said and "= 3 is not divisible by tp = 4" in said, said
    assert "does not divide it" in said and "multiple" in said, said
    mqa = tpcompile.plan(Transformer(config("debug", n_kv_heads=1)), tp=4)
    assert mqa.module_for("layers.0").grouped == {"attention.wk": 1, "attention.wv": 1}
    with pytest.warns(UserWarning, match="not divisible by tp = 4|stays replicated"):
        p = tpcompile.plan(Transformer(config("debug", **odd)), tp=4,
                           on_indivisible="replicate")
    assert "layers.0.attention.wq" not in p.layer_styles()
    assert p.layer_styles()["layers.0.feed_forward.w1"] == "colwise"  # the MLP still splits


def test_q_heads_fewer_than_tp_are_not_shared_by_groups():
    """2 q heads (1 kv head) at tp 4: kv heads may be shared by groups of ranks, q heads
    may not (they feed the rowwise output projection). The error says so, and with
    on_indivisible='replicate' the attention stays replicated (the grouping tried for the
    q heads must not turn into another error)."""
    from models.llama2 import Transformer, config
    few = dict(dim=16, n_heads=2, n_kv_heads=1)
    with pytest.raises(tpcompile.IndivisibleError) as e:
        tpcompile.plan(Transformer(config("debug", **few)), tp=4)
    said = str(e.value)
    assert "= 2 is not divisible by tp = 4" in said and "Only kv heads" in said, said
    assert "does not divide it" not in said, said
    with pytest.warns(UserWarning, match="not divisible by tp = 4"):
        p = tpcompile.plan(Transformer(config("debug", **few)), tp=4, on_indivisible="replicate")
    assert "layers.0.attention.wq" not in p.layer_styles()
    assert p.module_for("layers.0").grouped == {}


@pytest.mark.parametrize("where", ["install", "fsdp"])
def test_failure_midway_leaves_the_model_untouched(pool, where):
    for r in pool.run(jobs.failure_midway, where):
        assert r["calls"] == 2
        assert r["same_objects"] and r["no_forward"] and r["out_same"], r
        assert not any(c.startswith("FSDP") for c in r["classes"]), r["classes"]


def test_unknown_tracer():
    with pytest.raises(tpcompile.UnsupportedError, match="tracer='auto'"):
        tpcompile.plan(GatedMLPStack(), tp=2, tracer="jit")


def test_example_inputs_of_the_wrong_kind():
    """A dict of keyword inputs passed as ``example_inputs`` (a mistake that once reached
    torch.export and came back as its dynamic-shapes error) is refused naming its keys
    and where they go; a lone tensor is the one positional argument."""
    from models import hf_zoo
    model = hf_zoo.build("llama")
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(tpcompile.ExampleInputsError, match=r"keys input_ids, labels\): keyword "
                       r"inputs go in example_kwargs"):
        tpcompile.plan(model, tp=2, example_inputs={"input_ids": ids, "labels": ids})
    with pytest.raises(tpcompile.ExampleInputsError, match="is a str"):
        tpcompile.plan(GatedMLPStack(), tp=2, example_inputs="x")
    p = tpcompile.plan(GatedMLPStack(), tp=2, example_inputs=torch.randn(2, 4, 32))
    assert any(s == "colwise" for s in p.layer_styles().values())


def test_both_front_ends_failing_say_what_each_said():
    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on a value: neither export nor fx can trace it
                return self.w(x)
            return x

    with pytest.raises(tpcompile.TraceError) as e:
        tpcompile.plan(DataDependent(), tp=2, example_inputs=(torch.randn(2, 4),))
    msg = str(e.value)
    assert "torch.export said" in msg and "torch.fx said" in msg and "(2, 4)" in msg


def test_tp_must_be_positive():
    for tp in (0, -2, 1.5):
        with pytest.raises(ValueError, match="tp must be a positive integer"):
            tpcompile.plan(GatedMLPStack(), tp=tp)


class SharedWeight(nn.Module):
    """Two Linears that share one weight (``c.weight = a.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
        self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 8)
        self.c.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x).relu())
        return self.d(self.c(x).relu())


def test_two_linears_sharing_one_weight_are_reported():
    with pytest.warns(UserWarning, match="shares its weight") as w:
        p = tpcompile.plan(SharedWeight(), tp=2, example_inputs=(torch.randn(2, 4, 8),))
    assert not {"a", "b", "c"} & set(p.layer_styles())
    reasons = " ".join(n.reason for n in p.notes())
    assert "shares its weight" in reasons and "give each layer its own weight" in reasons
    assert not any("has no rule" in str(x.message) for x in w)


def test_planning_warnings_point_at_the_callers_line_and_obey_its_filters():
    """The analysis's warnings are said once planning is done (a block's own analysis,
    dropped when its parent traces it inline, says nothing), through the caller's line:
    a filter on the caller's module silences them, as it did when they were said at once."""
    import warnings
    args = (torch.randn(2, 4, 8),)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpcompile.plan(SharedWeight(), tp=2, example_inputs=args)
    said = [w for w in caught if str(w.message).startswith("tpcompile")]
    assert said and all(w.filename == __file__ for w in said), [(w.filename, str(w.message)) for w in said]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module=__name__)
        tpcompile.plan(SharedWeight(), tp=2, example_inputs=args)
    assert not [w for w in caught if str(w.message).startswith("tpcompile")]


class AssignsAttributes(nn.Module):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
        self.what, self.last, self.calls = what, None, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).relu()
        if self.what == "tensor":
            self.last = h
        else:
            self.calls += 1
        return self.b(h)


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_tensor_attribute_assigned_in_forward_is_refused(tracer):
    m = AssignsAttributes("tensor")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(tpcompile.UnsupportedError, match=r"assigns a tensor to self.last .*"
                       r"register_buffer\('last'"):
        tpcompile.plan(m, tp=2, example_inputs=(torch.randn(2, 4, 8),), tracer=tracer)
    assert m.last is None and m.calls == 0  # nothing written into the user's model
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_plain_attribute_assigned_in_forward_is_a_warning():
    m = AssignsAttributes("int")
    with pytest.warns(UserWarning, match=r"assigns self.calls .* will not change at run time"):
        tpcompile.plan(m, tp=2, example_inputs=(torch.randn(2, 4, 8),))
    assert m.calls == 0


def test_indivisible_heads_under_fx_replicate_and_end():
    """Under fx the indivisible op is named after itself, not a layer; the fallback used
    to find nothing to replicate and loop forever. It must replicate the segment."""
    from tests.property.arch import AttnSpec, BlockSpec, Spec, build, make_inputs
    spec = Spec(dim=32, block=BlockSpec(norm="rms", attn=AttnSpec(
        n_heads=12, n_kv_heads=3, head_dim=2, kv_repeat="interleave")), vocab=24)
    with pytest.warns(UserWarning, match="not divisible by tp = 4"):
        p = tpcompile.plan(build(spec, 1), tp=4, example_inputs=make_inputs(spec, 2, 8, 1),
                           on_indivisible="replicate", tracer="fx")
    assert not any(".attn." in k for k in p.layer_styles())
    assert any("not divisible by tp = 4" in n.reason for n in p.notes())


class _RoundSTE(torch.autograd.Function):
    """Fake quantization as quantization-aware training writes it: forward rounds to a
    grid, backward passes the gradient straight through (not the derivative of round)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class _SiLU(torch.autograd.Function):
    """A hand-written derivative (as BLOOM writes its GeLU): the same gradients as
    autograd's of the forward's ops, so the traced program's are right."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s))


class _QuantizedMLP(nn.Module):
    def __init__(self, fn: type = _RoundSTE) -> None:
        super().__init__()
        self.up, self.down, self.fn = nn.Linear(8, 16), nn.Linear(16, 8), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.fn.apply(self.up(x).relu()))


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_a_custom_backward_is_refused_where_gradients_are_wanted(tracer):
    """The trace keeps a Function's forward ops only: the program would differentiate
    round() (zero gradient) instead of passing it straight through. Refused, naming the
    Function and its line; the user's model and torch's Function.apply left as they were.
    Frozen (inference), the same model plans."""
    m = _QuantizedMLP()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    apply = torch.autograd.Function.__dict__["apply"]
    with pytest.raises(tpcompile.UnsupportedError, match=r"_RoundSTE, a torch.autograd.Function "
                       r"with a backward of its own \(at .*test_errors.py:\d+\); it (is not the "
                       r"derivative of its forward|could not be checked: no shapes).*"
                       r"requires_grad_\(False\)"):
        tpcompile.plan(m, tp=2, example_inputs=(torch.randn(2, 4, 8),), tracer=tracer)
    assert torch.autograd.Function.__dict__["apply"] is apply
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())
    p = tpcompile.plan(m.requires_grad_(False), tp=2, example_inputs=(torch.randn(2, 4, 8),),
                       tracer=tracer)
    assert p.layer_styles() == {"down": "rowwise", "up": "colwise"}
    with pytest.raises(tpcompile.UnsupportedError, match="_RoundSTE"):  # not a remembered trace
        tpcompile.plan(m.requires_grad_(True), tp=2, example_inputs=(torch.randn(2, 4, 8),),
                       tracer=tracer)
    if tracer == "fx":  # symbolic values: nothing to check a backward on
        with pytest.raises(tpcompile.UnsupportedError, match="_SiLU.*could not be checked"):
            tpcompile.plan(_QuantizedMLP(_SiLU), tp=2, example_inputs=(torch.randn(2, 4, 8),),
                           tracer=tracer)
        return
    p = tpcompile.plan(_QuantizedMLP(_SiLU), tp=2, example_inputs=(torch.randn(2, 4, 8),),
                       tracer=tracer)  # its backward checked to be the derivative
    assert p.layer_styles() == {"down": "rowwise", "up": "colwise"}


class _QuantizedStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_QuantizedMLP() for _ in range(2))
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


@pytest.mark.parametrize("frozen", ["first block", "all but the blocks"])
def test_a_custom_backward_is_refused_in_a_partly_frozen_model(frozen):
    """Whether gradients are wanted is the whole model's question: with the first block
    frozen, the trainable second shares its trace; LoRA-style, the root is frozen and
    the blocks train, their gradients flowing through the STE all the same."""
    m = _QuantizedStack()
    if frozen == "first block":
        m.layers[0].requires_grad_(False)
    else:
        m.requires_grad_(False)
        m.layers[1].up.requires_grad_(True)
    with pytest.raises(tpcompile.UnsupportedError, match="_RoundSTE"):
        tpcompile.plan(m, tp=2, example_inputs=(torch.randn(2, 4, 8),))


def test_planned_frozen_a_call_wanting_gradients_is_refused(pool):
    """Frozen, the model with a straight-through Function plans and computes its forward
    right (also under no_grad); unfrozen afterwards, a call with gradients on is refused
    instead of differentiating round()."""
    for r in pool.run(jobs.frozen_custom_backward):
        assert r["out_same"] and r["no_grad_same"], r
        assert "_RoundSTE" in r["refused"] and "planned with its parameters frozen" in \
            r["refused"], r
