"""Worker-pool jobs for plan files and interop (module level, so they pickle by reference)."""

from __future__ import annotations

import copy

import torch
from torch.distributed.tensor.parallel import parallelize_module

import tpcompile
from tests.harness import judge, numerics_result, tp_mesh
from tpcompile.verify import align_grads, check_tensor, planned_placements
from tests.jobs import build as _build


class _Attention(torch.nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.n_heads = self.n_kv_heads = heads  # divided by tp for parallelize_module
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class _GPTBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.fc, self.proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln_2(x))))


class GPTWithPositions(torch.nn.Module):
    """GPT-2's layout with separate q/k/v: token and learned position embeddings, the
    position table looked up by ``arange(T)`` ([T, d], broadcast over the batch)."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, layers: int = 2,
                 positions: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(positions, d)
        self.h = torch.nn.ModuleList([_GPTBlock(d, heads) for _ in range(layers)])
        self.ln_f, self.lm_head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build(name: str) -> tuple[torch.nn.Module, tuple]:
    if name == "gpt_positions":
        torch.manual_seed(0)
        return GPTWithPositions(), (torch.randint(0, 64, (2, 8)),)
    if name == "nanogpt":
        from models import nanogpt as G
        torch.manual_seed(0)
        return G.GPT(G.CONFIGS["tiny"]), (G.example_inputs("tiny", 2, 8)["idx"],)
    return _build(name)


def _divide_heads(model: torch.nn.Module, tp: int) -> None:
    """What every hand-written parallelize_module plan needs for views by head count."""
    for m in model.modules():
        if hasattr(m, "n_heads") and hasattr(m, "n_kv_heads") and m is not model:
            m.n_heads //= tp
            m.n_kv_heads //= tp


def parallelize_module_matches(rank: int, name: str, tp: int, sp: bool) -> dict:
    """Apply tpcompile.to_parallelize_plan(plan) with parallelize_module; compare it with tpcompile's
    rewrite (outputs) and with the unsharded model (outputs and every gradient)."""
    ref, inputs = build(name)
    plan = tpcompile.plan(ref, tp=tp, sequence_parallel=sp)
    pt = copy.deepcopy(ref)
    _divide_heads(pt, tp)
    parallelize_module(pt, tp_mesh(tp), tpcompile.to_parallelize_plan(plan))
    ours = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), sequence_parallel=sp)
    with torch.no_grad():
        vs_ours = check_tensor("output vs tpcompile's", pt(*inputs), ours(*inputs))
    # parallelize_module leaves the sequence-parallel norms' gradients Partial and the
    # vocab-parallel embedding's Replicate, for the optimizer step to put right; do what
    # that step does, then judge as usual
    rep = judge(ref, pt, inputs, placements=planned_placements(pt, plan),
                after_backward=align_grads)
    sharded = sorted(n for n, p in pt.named_parameters()
                     if hasattr(p, "placements") and any(pl.is_shard() for pl in p.placements))
    return {"error": None, "vs_ours": vs_ours, "report": rep, "sharded": sharded}


def given_plan(rank: int, name: str, tp: int, plan_path: str) -> dict:
    """auto_parallelize with a plan file: numerics and the styles it applied."""
    ref, inputs = build(name)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), plan=plan_path)
    return numerics_result(ref, par, inputs)


def refused_plan(rank: int, name: str, tp: int, plan_path: str) -> dict:
    """A plan that does not fit is refused with a PlanError, the model left unchanged."""
    model, _ = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        tpcompile.auto_parallelize(model, tp_mesh(tp), plan=plan_path)
    except tpcompile.TPCompileError as e:
        after = model.state_dict()
        same = all(type(after[k]) is torch.Tensor and torch.equal(after[k], v)
                   for k, v in before.items())
        return {"error": type(e).__name__, "message": str(e), "unchanged": same,
                "forward_kept": "forward" not in model.__dict__}
    return {"error": None}


def counted_collectives(rank: int, tp: int, batch: int, seq: int) -> list[tuple[str, int]]:
    """(kind, numel of the full tensor) of every collective one forward+backward runs."""
    from tpcompile.counting import CollectiveCounter
    ref, _ = build("llama")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp))
    tokens = torch.randint(0, ref.args.vocab_size, (batch, seq))
    with CollectiveCounter() as c:
        par(tokens).float().pow(2).mean().backward()
    out = []
    for kind, shape in c.log:
        n = 1
        for s in shape:
            n *= s
        out.append((kind, n * tp if kind == "all_gather" else n))
    return sorted(out)
