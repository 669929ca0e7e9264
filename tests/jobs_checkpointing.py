"""Activation checkpointing of the parallel model's blocks (jobs): numerics against the
unsharded model, what forward keeps, what backward runs again, dropout masks replayed,
under FSDP2 and torch.compile."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

import tpcompile
from tests import jobs_hf as H
from tests.harness import mesh, tp_mesh
from tpcompile.counting import CollectiveCounter
from tpcompile.verify import full


def _saved_bytes(fn: Any) -> tuple[Any, int]:
    """``fn()``'s result and the bytes autograd keeps for backward while it runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def numerics(rank: int, family: str, tp: int, sp: bool, setting: Any,
             transformers: dict | None = None) -> dict:
    """``activation_checkpointing=setting``: outputs and every gradient against the
    unsharded model; the bytes forward saves and the collectives backward runs, beside
    the same parallel model without checkpointing. ``transformers``: the model's own
    ``gradient_checkpointing_enable(**transformers)`` is called first (as a fine-tuning
    script does); then the layers' flags and input-grads hooks left after are returned."""
    ref, args, kwargs = H.build(family)
    plain = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_kwargs=kwargs,
                                       sequence_parallel=sp)
    model = copy.deepcopy(ref)
    if transformers is not None:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its name, deprecated in 5.x
            model.gradient_checkpointing_enable(**transformers)
    par = tpcompile.auto_parallelize(model, tp_mesh(tp), example_kwargs=kwargs,
                                     sequence_parallel=sp, activation_checkpointing=setting)
    found: dict[str, Any] = {}
    for name, model in (("plain", plain), ("ckpt", par)):
        out, saved = _saved_bytes(lambda m=model: m(*args, **kwargs))
        with CollectiveCounter() as c:
            H.loss_of(out).backward()
        found[name] = {"saved": saved, "backward": dict(c.counts), "out": out}
    o_ref = ref(*args, **kwargs)
    H.loss_of(o_ref).backward()
    wrapped = [n for n, m in par.named_modules()
               if getattr(m.__dict__.get("forward"), "_tpcompile_checkpointed", False)]
    flags = [n for n, m in par.named_modules() if getattr(m, "gradient_checkpointing", None)]
    hooks = sum(len(m._forward_hooks) for m in par.modules())
    return dict(H.judge(ref, par, o_ref, found["ckpt"]["out"]), wrapped=wrapped,
                flags=flags, hooks=hooks,
                saved={k: v["saved"] for k, v in found.items()},
                backward={k: v["backward"] for k, v in found.items()},
                layers=ref.config.num_hidden_layers if hasattr(ref, "config") else None)


def dropout_replayed(rank: int) -> dict:
    """nanoGPT with dropout 0.1, training: each tp rank draws its own masks inside the
    sharded regions. With every block checkpointed, the recompute must draw the same
    masks as the forward: loss and every gradient equal to the same parallel model
    without checkpointing, from the same seeds."""
    ref, args, kwargs = H.build("nanogpt", dropout=0.1)
    ref.train()
    results = {}
    for setting in (None, "block"):
        torch.manual_seed(7)
        from tpcompile.rewrite import collectives as C
        C._RANK_RNG.clear()  # both runs start the tp ranks' own streams from their seeds
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs,
                                         activation_checkpointing=setting)
        par.train()
        torch.manual_seed(11)
        C._RANK_RNG.clear()
        losses = []
        for _ in range(2):  # the second step draws from streams the first one advanced
            par.zero_grad(set_to_none=True)
            loss = H.loss_of(par(*args, **kwargs))
            loss.backward()
            losses.append(loss.item())
        results[setting or "none"] = (losses, {n: full(p.grad).clone()
                                               for n, p in par.named_parameters()})
    (l0, g0), (l1, g1) = results["none"], results["block"]
    return {"losses": (l0, l1),
            "grad_diff": {n: float((g1[n] - g).abs().max()) for n, g in g0.items()},
            "dropped": l0[0] != H.loss_of(ref(*args, **kwargs)).item()}


def on_fsdp(rank: int) -> dict:
    """dp 2 x tp 2, every block checkpointed under FSDP2 (which reshards each block's
    parameters after forward and gathers them again for the recompute): three AdamW
    steps against the single-process model."""
    from tests import jobs_fsdp
    return jobs_fsdp.train_vs_reference(rank, activation_checkpointing="block")


def compiled(rank: int) -> dict:
    """``compile=`` with checkpointing on a 1-D mesh: each block compiled on its own and
    checkpointed around its compiled forward; outputs and gradients against the
    unsharded model."""
    torch._dynamo.reset()
    ref, args, kwargs = H.build("llama")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs,
                                     compile={"backend": "aot_eager"},
                                     activation_checkpointing="block")
    o_par = par(**kwargs)
    H.loss_of(o_par).backward()
    o_ref = ref(**kwargs)
    H.loss_of(o_ref).backward()
    inner = [n for n, m in par.named_modules()
             if "_torchdynamo_orig_callable" in dir(getattr(m.__dict__.get("forward"), "__wrapped__", None))]
    return dict(H.judge(ref, par, o_ref, o_par), compiled_inside=inner)


def bad_settings(rank: int) -> dict:
    """Settings that name no blocks: the error names the model, its block count and the
    fix; the model is left as it was."""
    ref, args, kwargs = H.build("llama")
    out = {}
    for setting in ("blocks", 3, -1, 2.5):
        model = copy.deepcopy(ref)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            tpcompile.auto_parallelize(model, tp_mesh(2), example_kwargs=kwargs,
                                       activation_checkpointing=setting)
            out[repr(setting)] = None
        except tpcompile.TPCompileError as e:
            untouched = all(type(p) is nn.Parameter and torch.equal(p, before[n])
                            for n, p in model.named_parameters()) and "forward" not in model.__dict__
            out[repr(setting)] = (type(e).__name__, str(e), untouched)
    return out


def transformers_refused(rank: int) -> dict:
    """transformers' checkpointing tpcompile cannot do the same way (every second layer;
    activations offloaded to host memory) or that contradicts the argument: refused by
    name, the model left as it was (its flags and hooks included)."""
    import warnings
    ref, args, kwargs = H.build("llama", num_hidden_layers=4)
    out = {}
    for case, enable, setting in (("every_2", {"every_n_layers": 2}, None),
                                  ("offload", {"offload": True}, None),
                                  ("contradicted", {}, 1)):
        model = copy.deepcopy(ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(**enable)
        flags = {n: m.gradient_checkpointing for n, m in model.named_modules()
                 if hasattr(m, "gradient_checkpointing")}
        hooks = sum(len(m._forward_hooks) for m in model.modules())
        try:
            tpcompile.auto_parallelize(model, tp_mesh(2), example_kwargs=kwargs,
                                       activation_checkpointing=setting)
            out[case] = None
        except tpcompile.TPCompileError as e:
            untouched = "forward" not in model.__dict__ and hooks == sum(
                len(m._forward_hooks) for m in model.modules()) and flags == {
                n: m.gradient_checkpointing for n, m in model.named_modules()
                if hasattr(m, "gradient_checkpointing")}
            out[case] = (type(e).__name__, str(e), untouched)
    # turned on after auto_parallelize (what the Trainer does with the model it is given)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        par.gradient_checkpointing_enable()
    try:
        par(**kwargs)
        out["after"] = None
    except tpcompile.TPCompileError as e:
        out["after"] = (type(e).__name__, str(e), True)
    return out


def unsplittable_length(rank: int) -> dict:
    """Sequence parallelism planned, then a sequence of 7 tokens (not divisible by tp 2)
    runs the program without it; every block checkpointed, so the recompute in backward
    must run that variant too, with no root program running then (the variant is replayed,
    and the programs' shape guards would refuse the other one: both would have to break
    for this to fail)."""
    ref, args, kwargs = H.build("llama")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs,
                                     sequence_parallel=True, activation_checkpointing="block")
    with torch.no_grad():  # a program with SP for every length (dynamic shapes)
        par(**H._inputs("llama", kwargs, 2, 12, False))
    kw = H._inputs("llama", kwargs, 2, 7, False)
    o_par = par(**kw)
    H.loss_of(o_par).backward()
    o_ref = ref(**kw)
    H.loss_of(o_ref).backward()
    return dict(H.judge(ref, par, o_ref, o_par),
                variants=sorted(p.sp for p in par.__dict__["_tpcompile_runtime"].programs))
