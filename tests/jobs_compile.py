"""torch.compile of the parallel model (jobs): fullgraph on a 1-D mesh, per-block under
FSDP2 on dp x tp, against the unsharded model and the eager parallel model."""

from __future__ import annotations

import copy

import torch

import tpcompile
from tests import jobs_hf as H
from tests.harness import mesh, tp_mesh


def _fresh() -> None:
    """A job's compiles start from nothing (another job's models filled the workers'
    caches, and dynamo recompiles a code object only so many times)."""
    torch._dynamo.reset()


def fullgraph(rank: int, family: str, tp: int, backend: str,
              shapes: list[tuple[int, int]], head_chunks: int = 0) -> list[dict]:
    """``torch.compile(parallel, fullgraph=True)``: graph breaks counted by
    ``torch._dynamo.explain``, then at each (batch, seq) outputs and every gradient of
    the compiled model against the unsharded one, and its outputs against eager's. With
    ``head_chunks``, the head's logits are computed and gathered in that many chunks of
    rows (the chunk size set from the first shape), as large logits are."""
    _fresh()
    ref, args, kwargs = H.build(family)
    with H.head_in_chunks(ref, shapes[0][0] * shapes[0][1], head_chunks):
        return _fullgraph(ref, kwargs, family, tp, backend, shapes)


def _fullgraph(ref: torch.nn.Module, kwargs: dict, family: str, tp: int, backend: str,
               shapes: list[tuple[int, int]]) -> list[dict]:
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_kwargs=kwargs,
                                     dynamic=True)
    explained = torch._dynamo.explain(par)(**kwargs)
    breaks = [b.reason.splitlines()[0] for b in explained.break_reasons]
    compiled = torch.compile(par, fullgraph=True, backend=backend, dynamic=len(shapes) > 1)
    out = []
    for batch, seq in shapes:
        kw = H._inputs(family, kwargs, batch, seq, False)
        with torch.no_grad():
            eager = H._leaves(par(**kw))
        ref.zero_grad(set_to_none=True)
        par.zero_grad(set_to_none=True)
        o_ref, o_par = ref(**kw), compiled(**kw)
        H.loss_of(o_ref).backward()
        H.loss_of(o_par).backward()
        verdict = H.judge(ref, par, o_ref, o_par)
        vs_eager = max(float((v - eager[k]).abs().max()) for k, v in H._leaves(o_par).items()
                       if isinstance(v, torch.Tensor))
        out.append(dict(verdict, shape=(batch, seq), graphs=explained.graph_count,
                        breaks=breaks, vs_eager=vs_eager,
                        programs=len(par.__dict__["_tpcompile_runtime"].programs)))
    return out


def per_block(rank: int, family: str, backend: str) -> dict:
    """``auto_parallelize(..., compile=...)`` on dp 2 x tp 2: each FSDP block's forward
    compiled with fullgraph, FSDP2's hooks eager; two steps against the unsharded model."""
    _fresh()
    from torch._dynamo.utils import counters
    m = mesh((2, 2), ("dp", "tp"))
    ref, args, kwargs = H.build(family)
    before = counters["stats"]["unique_graphs"]
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), m, example_kwargs=kwargs,
                                     compile={"backend": backend})
    blocks = [n for n, mod in par.named_modules()
              if "_torchdynamo_orig_callable" in dir(mod.__dict__.get("forward"))]
    dp, me = m["dp"].size(), m["dp"].get_local_rank()
    mine = {k: v.chunk(dp, 0)[me] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    verdicts = []
    for _ in range(2):
        ref.zero_grad(set_to_none=True)
        par.zero_grad(set_to_none=True)
        o_ref, o_par = ref(**kwargs), par(**mine)
        H.loss_of(o_ref).backward()
        H.loss_of(o_par).backward()
        verdicts.append(H.judge(ref, par, o_ref, o_par, dp=dp))
    return {"verdicts": verdicts, "compiled": blocks, "graphs": counters["stats"]["unique_graphs"] - before}


def bf16(rank: int, family: str, dp: int) -> dict:
    """bf16 against the fp32 model, beside the unsharded model's own bf16 error: per
    output and gradient, (parallel bf16 error, unsharded bf16 error), both relative to
    the fp32 model. tp 2 runs bf16 parameters; dp 2 x tp 2 keeps fp32 master weights and
    computes in bf16 through FSDP2's MixedPrecisionPolicy (gradients reduced in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    ref, args, kwargs = H.build(family)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    if dp == 1:
        par = tpcompile.auto_parallelize(copy.deepcopy(ref16), tp_mesh(2), example_kwargs=kwargs)
        mine = kwargs
    else:
        m = mesh((dp, 2), ("dp", "tp"))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), m, example_kwargs=kwargs,
                                         mp_policy=policy)
        me = m["dp"].get_local_rank()
        mine = {k: v.chunk(dp, 0)[me] if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}
    outs = {}
    for name, model, kw in (("ref", ref, kwargs), ("ref16", ref16, kwargs), ("par", par, mine)):
        o = model(**kw)
        H.loss_of(o).backward()  # FSDP averages the dp halves' gradients: the full batch's
        outs[name] = o
    errs: dict[str, tuple[float, float]] = {}
    if dp == 1:
        lo = H._leaves(outs["ref"])
        for k, v in H._leaves(outs["par"]).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                errs[f"out {k}"] = (H._err(v.float(), lo[k]),
                                    H._err(H._leaves(outs["ref16"])[k].float(), lo[k]))
    p16 = dict(ref16.named_parameters())
    for n, p in ref.named_parameters():
        q = dict(par.named_parameters())[n]
        g = H.full(q.grad).float()
        errs[n] = (H._err(g, p.grad), H._err(p16[n].grad.float(), p.grad))
    dtypes = sorted({str(p.dtype) for p in par.parameters()})
    return {"errs": errs, "dtypes": dtypes, "computed": str(outs["par"].logits.dtype)}


def unplanned_size(rank: int) -> dict:
    """A program specialised to its example's sizes (``dynamic`` off), compiled with
    fullgraph=True and called at another size: dynamo stops with tpcompile's message, and
    without fullgraph the call breaks the graph, is planned eagerly and runs."""
    _fresh()
    ref, args, kwargs = H.build("llama")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs)
    kw = H._inputs("llama", kwargs, 3, 5, False)
    try:
        torch.compile(par, fullgraph=True, backend="eager")(**kw)
    except Exception as e:  # noqa: BLE001 - dynamo's Unsupported
        message = f"{type(e).__name__}: {e}"
    else:
        message = ""
    o_par = torch.compile(par, backend="eager")(**kw)
    o_ref = ref(**kw)
    H.loss_of(o_ref).backward()
    H.loss_of(o_par).backward()
    return {"message": message, "verdict": H.judge(ref, par, o_ref, o_par)}


def branch_on_rows(rank: int, kind: str) -> dict:
    """A dynamic program of a model that branches on both sizes (``jobs_shapes.BranchOnRows``,
    planned at 4 x 8), compiled: on the same side it serves, on the other side fullgraph
    stops with tpcompile's message, and without fullgraph the call breaks the graph and gets
    a program of its own; then the first side again. Each served call against the
    unsharded model; the programs held after each."""
    from tests.jobs_shapes import BRANCH_CALLS, BranchOnRows
    _fresh()
    torch.manual_seed(0)
    ref = BranchOnRows(kind)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2),
                                     example_inputs=(torch.randn(4, 8, 8),), dynamic=True)
    full, plain = (torch.compile(par, backend="eager", fullgraph=f) for f in (True, False))
    first, same, other, again = BRANCH_CALLS[kind]
    out: dict = {"verdicts": [], "programs": [], "message": ""}
    for (batch, seq), run in ((first, full), (same, full), (other, None), (other, plain),
                              (again, plain)):
        x = torch.randn(batch, seq, 8, generator=torch.Generator().manual_seed(batch * seq))
        if run is None:
            try:
                full(x)
            except Exception as e:  # noqa: BLE001 - dynamo's Unsupported
                out["message"] = f"{type(e).__name__}: {e}"
            continue
        ref.zero_grad(set_to_none=True)
        par.zero_grad(set_to_none=True)
        o_ref, o_par = ref(x), run(x)
        H.loss_of(o_ref).backward()
        H.loss_of(o_par).backward()
        out["verdicts"].append(H.judge(ref, par, o_ref, o_par))
        out["programs"].append(len(par.__dict__["_tpcompile_runtime"].programs))
    return out


def no_grad(rank: int, family: str) -> dict:
    """``torch.compile(parallel, fullgraph=True)`` called under ``torch.no_grad()`` (inference,
    generation): its outputs against the eager parallel model's and the unsharded model's."""
    _fresh()
    ref, args, kwargs = H.build(family)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs,
                                     dynamic=True)
    compiled = torch.compile(par, fullgraph=True, backend="eager")
    with torch.no_grad():
        o_ref, eager = H._leaves(ref(**kwargs)), H._leaves(par(**kwargs))
        try:
            out = H._leaves(compiled(**kwargs))
        except Exception as e:  # noqa: BLE001 - dynamo's
            return {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    tensors = [k for k, v in o_ref.items() if isinstance(v, torch.Tensor)]
    return {"error": None, "fields": sorted(tensors),
            "vs_eager": max(float((out[k] - eager[k]).abs().max()) for k in tensors),
            "vs_ref": max(H._err(out[k], o_ref[k]) for k in tensors)}


def dropout_refused(rank: int) -> dict:
    """nanoGPT with dropout 0.1 in train mode: compiling its sharded dropouts is refused
    by name, and the eager model still runs."""
    _fresh()
    ref, args, kwargs = H.build("nanogpt", dropout=0.1)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs)
    compiled = torch.compile(par, fullgraph=True, backend="aot_eager")
    try:
        compiled(**kwargs)
    except Exception as e:  # noqa: BLE001 - dynamo may wrap it
        message = f"{type(e).__name__}: {e}"
    else:
        message = ""
    eager = par(**kwargs)
    other = copy.deepcopy(ref)
    try:  # auto_parallelize(compile=True) says so up front, and leaves the model as it was
        tpcompile.auto_parallelize(other, tp_mesh(2), example_kwargs=kwargs, compile=True)
        refused = ""
    except tpcompile.TPCompileError as e:
        refused = f"{type(e).__name__}: {e}"
    untouched = "_tpcompile_plan" not in other.__dict__ and "forward" not in other.__dict__
    return {"message": message, "eager_ran": eager is not None, "refused": refused,
            "untouched": untouched}
