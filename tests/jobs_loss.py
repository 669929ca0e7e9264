"""A model's own cross-entropy over a colwise head's logits, computed vocab-parallel
(jobs): the loss function alone against ``F.cross_entropy``, and models whose forward
ends in a loss as nanoGPT's and Hugging Face's do."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import tpcompile
from tests.harness import numerics_result, tp_mesh
from tpcompile.counting import CollectiveCounter
from tpcompile.rewrite.loss import vocab_cross_entropy

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def loss_function(rank: int, case: dict) -> dict:
    """``vocab_cross_entropy`` on this rank's classes against ``F.cross_entropy`` on all
    of them: the loss, and this rank's columns of the scores' gradient."""
    mesh = tp_mesh(2)
    torch.manual_seed(case.get("seed", 0))
    shape, classes = case["shape"], case["shape"][1]
    dtype = case.get("dtype", torch.float32)
    x = (torch.randn(shape) * 3).to(dtype)
    masked = case.get("masked", 0)  # leading classes masked to -inf (a padded vocabulary)
    x[:, :masked] = float("-inf")
    x.requires_grad_()
    t_shape = (shape[0], *shape[2:])
    t = torch.randint(masked, classes, t_shape)
    ignore = case.get("ignore_index", -100)
    t = t.masked_fill(torch.rand(t_shape) < case.get("ignored", 0.0), ignore)
    if "bad_target" in case:
        t[0] = case["bad_target"]
    opts = {"reduction": case.get("reduction", "mean"), "ignore_index": ignore,
            "label_smoothing": case.get("smoothing", 0.0)}
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.get("autocast", False))
    mine = x.detach().chunk(2, 1)[mesh.get_local_rank()].clone().requires_grad_()
    raised = []
    for fn in (lambda: F.cross_entropy(x, t, **opts),
               lambda: vocab_cross_entropy(mine, t, REDUCTIONS[opts["reduction"]], ignore,
                                           opts["label_smoothing"], mesh.get_group().group_name)):
        try:
            with amp:
                fn()
        except Exception as e:  # noqa: BLE001 - the two must fail alike
            raised.append((type(e).__name__, str(e)))
    if raised:
        return {"raised": raised}
    with amp:
        ref = F.cross_entropy(x, t, **opts)
    g = torch.randn(ref.shape).to(ref.dtype) if ref.dim() else torch.tensor(1.7, dtype=ref.dtype)
    ref.backward(g)
    with amp:
        out = vocab_cross_entropy(mine, t, REDUCTIONS[opts["reduction"]], ignore,
                                  opts["label_smoothing"], mesh.get_group().group_name)
    out.backward(g)
    out, ref = out.detach(), ref.detach()
    want = x.grad.chunk(2, 1)[mesh.get_local_rank()]
    scale = lambda a: float(a.abs().max().clamp_min(1e-30))  # noqa: E731
    return {"loss": (out.float().tolist(), ref.float().tolist()),
            "loss_err": float((out.float() - ref.float()).abs().max()) / scale(ref.float()),
            "grad_err": float((mine.grad.float() - want.float()).abs().max()) / scale(want.float()),
            "dtypes": (str(out.dtype), str(mine.grad.dtype)), "ref_dtype": str(ref.dtype),
            "grad_zero": (bool((mine.grad == 0).all()), bool((want == 0).all()))}


class LossGPT(nn.Module):
    """A small GPT whose forward ends as nanoGPT's and transformers' do: a Linear head,
    then ``F.cross_entropy`` over its logits with the targets the caller passes."""

    def __init__(self, vocab: int = 64, dim: int = 32, *, smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", layout: str = "flat",
                 class_weights: bool = False, returns: str = "both") -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.smoothing, self.ignore_index, self.reduction = smoothing, ignore_index, reduction
        self.layout, self.returns = layout, returns
        self.class_weight = nn.Parameter(torch.rand(vocab) + 0.5, requires_grad=False) \
            if class_weights else None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        x = self.emb(idx)
        x = x + self.down(F.gelu(self.up(x)))
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        opts = dict(ignore_index=self.ignore_index, label_smoothing=self.smoothing,
                    reduction=self.reduction, weight=self.class_weight)
        if self.layout == "flat":  # nanoGPT, transformers' ForCausalLMLoss
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), **opts)
        else:  # classes second: (B, V, S) against (B, S)
            loss = F.cross_entropy(logits.transpose(1, 2), targets, **opts)
        return loss if self.returns == "loss" else (logits, loss)


def model_loss(rank: int, kw: dict, sp: bool = False) -> dict:
    """``LossGPT(**kw)`` at tp 2 against the unsharded model: outputs (the loss, the
    logits when returned) and every gradient on this rank (the harness's judge), the
    head's placement, and the shapes of the all-gathers forward runs."""
    torch.manual_seed(0)
    ref = LossGPT(**kw)
    ignore = kw.get("ignore_index", -100)
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    targets[0, :3] = ignore
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), sequence_parallel=sp,
                                     example_inputs=(idx, targets))
    res = numerics_result(ref, par, (idx, targets))
    with torch.no_grad(), CollectiveCounter() as c:
        par(idx, targets)
    res["gathers"] = [shape for kind, shape in c.log if kind == "all_gather"]
    res["head"] = str(par.head.weight.placements) if hasattr(par.head.weight, "placements") else None
    return res


def hf_loss(rank: int, loss_parallel: bool) -> dict:
    """transformers' Llama called with ``labels``: the all-gathers its forward runs (the
    logits, pipelined in chunks, unless ``loss_parallel``; the loss's per-row statistics),
    and the loss and logits against the unsharded model."""
    from tests import jobs_hf as H
    from tpcompile.verify import full
    ref, _, kwargs = H.build("llama")
    kwargs = {"input_ids": kwargs["input_ids"], "labels": kwargs["labels"].clone()}
    kwargs["labels"][:, :2] = -100
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs,
                                     loss_parallel=loss_parallel)
    with torch.no_grad(), CollectiveCounter() as c:
        out = par(**kwargs)
    with torch.no_grad():
        want = ref(**kwargs)
    rows = kwargs["input_ids"].numel()
    return {"stats": [s for k, s in c.log if k == "all_gather" and s == (rows, 2)],
            "logits": [s for k, s in c.log if k == "all_gather" and s == (rows, want.logits.shape[-1] // 2)],
            "loss_err": abs(float(out.loss - want.loss)),
            "logits_err": float((full(out.logits) - want.logits).abs().max()),
            "logits_type": type(out.logits).__name__}
