"""Everyday training-loop use of a parallel model (jobs): autocast, a deep copy, weights
replaced after parallelizing, hooks added after parallelizing."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import tpcompile
from tests.harness import raised, tp_mesh
from tests.jobs_fsdp import llama, next_token_loss, tokens
from tpcompile.verify import full

BF16_TOL = 5e-2  # relative to each gradient's largest entry: a few bf16 ulps (8 bits)


def autocast(rank: int) -> dict:
    """Forward under ``torch.autocast(bfloat16)``, backward outside it, against the
    unsharded model doing the same: the loss, and every gradient (fp32, as the
    parameters) relative to its largest entry."""
    ref = llama()
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2))
    x = tokens(3, 512, 2, 16)
    out = {}
    for name, model in (("ref", ref), ("par", par)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = next_token_loss(model, x)
        loss.backward()
        out[name] = loss.item()
    pars = dict(par.named_parameters())
    errs = {n: float((full(pars[n].grad) - p.grad).abs().max() / p.grad.abs().max())
            for n, p in ref.named_parameters()}
    dtypes = sorted({str(p.grad.dtype) for p in par.parameters()})
    return {"losses": (out["ref"], out["par"]), "errs": errs, "dtypes": dtypes}


def deep_copy(rank: int) -> dict:
    """A deep copy of a parallel model that has been called (its input check holds the
    process group by then, which deepcopy cannot copy), scaled, then called at a size
    neither was planned for: its numbers are the scaled reference's, and the original
    gets no new program."""
    ref = llama()
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_inputs=(tokens(1, 512, 2, 16),))
    par(tokens(1, 512, 2, 16)).sum().backward()
    par.zero_grad(set_to_none=True)
    cp, ref2 = copy.deepcopy(par), copy.deepcopy(ref)
    with torch.no_grad():
        for a, b in zip(cp.parameters(), ref2.parameters()):
            a.mul_(1.5)
            b.mul_(1.5)
    x = tokens(2, 512, 3, 24)
    with torch.no_grad():
        err = float((cp(x) - ref2(x)).abs().max() / ref2(x).abs().max())
        err_orig = float((par(tokens(1, 512, 2, 16)) - ref(tokens(1, 512, 2, 16))).abs().max())
    return {"err": err, "err_orig": err_orig,
            "programs": (len(par.__dict__["_tpcompile_runtime"].programs),
                         len(cp.__dict__["_tpcompile_runtime"].programs))}


def replaced_weights(rank: int) -> dict:
    """Full weights put back as plain tensors after parallelizing (``load_state_dict(...,
    assign=True)``, a new nn.Parameter): the program would read them as shards, so the
    next call is refused, naming the parameter."""
    ref = llama()
    x = tokens(3, 512, 2, 16)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2))
    par.load_state_dict(ref.state_dict(), assign=True)
    assigned = raised(lambda: par(x))
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2))
    par.layers[0].attention.wq.weight = nn.Parameter(ref.layers[0].attention.wq.weight.detach().clone())
    one = raised(lambda: par(x))
    return {"assigned": assigned, "one": one}


def late_hooks(rank: int) -> dict:
    """A hook added after parallelizing to a module the program computes inline would
    never run: the call is refused, naming it; removed, the model runs again. A hook on
    a block still runs."""
    ref = llama()
    x = tokens(3, 512, 2, 16)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2))
    handle = par.layers[0].attention.wq.register_forward_hook(lambda m, a, o: o * 2)
    refused = raised(lambda: par(x))
    handle.remove()
    seen: list[tuple[int, ...]] = []
    par.layers[1].register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        err = float((par(x) - ref(x)).abs().max())
    return {"refused": refused, "block_hook_calls": len(seen), "err": err}


def clip_norm(rank: int) -> dict:
    """``clip_grad_norm_`` over the parallel model's DTensor parameters (sharded and
    replicated on the tp mesh): the total norm and the clipped gradients of the
    unsharded model."""
    ref = llama()
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2))
    x = tokens(3, 512, 2, 16)
    next_token_loss(ref, x).backward()
    next_token_loss(par, x).backward()
    n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    n_par = torch.nn.utils.clip_grad_norm_(par.parameters(), 0.1)
    pars = dict(par.named_parameters())
    worst = max(float((full(pars[n].grad) - p.grad).abs().max() / p.grad.abs().max())
                for n, p in ref.named_parameters())
    return {"norms": (float(n_ref), float(full(n_par))), "worst": worst}


def pickled(rank: int) -> dict:
    """``torch.save`` of the whole parallel module: refused naming what to save instead
    (it was a raw PicklingError on the generated forward); its state_dict saves."""
    import io
    par = tpcompile.auto_parallelize(llama(), tp_mesh(2))
    whole = raised(lambda: torch.save(par, io.BytesIO()))
    buf = io.BytesIO()
    torch.save(par.state_dict(), buf)
    return {"whole": whole, "state_dict_bytes": buf.tell()}


def accumulated(rank: int) -> dict:
    """Gradient accumulation, as HF's Trainer and most loops do it: two micro-batches'
    forward and backward (the second of another sequence length, so planned again
    between them) before any optimizer step, on an HF Llama at tp 2, against the
    unsharded model doing the same: the second call's outputs and every accumulated
    gradient (with placements), on this rank."""
    from tests.jobs_hf import build, judge, loss_of
    ref, _, kwargs = build("llama")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs)
    g = torch.Generator().manual_seed(5)
    outs = []
    for seq in (8, 12):
        ids = torch.randint(0, 128, (4, seq), generator=g)
        o_ref, o_par = ref(input_ids=ids, labels=ids), par(input_ids=ids, labels=ids)
        loss_of(o_ref).backward()
        loss_of(o_par).backward()
        outs = [o_ref, o_par]
    return judge(ref, par, *outs)
