"""Jobs for the 2-D (dp, tp) tests: FSDP2 on dp over tpcompile's tp program, meta-device
init, and DCP checkpoints. Module level so the worker pool pickles them by reference."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import tpcompile
from models.llama2 import Transformer, config
from tests.harness import compare, full, mesh
from tpcompile.verify import RTOL, Report, check_tensor, shadow
from tpcompile.runtime.distribute import local_param_bytes

BATCH, SEQ = 4, 8  # the full batch; each of the 2 dp ranks gets BATCH // 2 rows


def mesh2d() -> Any:
    return mesh((2, 2), ("dp", "tp"))


def tokens(seed: int, vocab: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def my_rows(x: torch.Tensor, m: Any) -> torch.Tensor:
    """This dp rank's share of the full batch."""
    return x.chunk(m["dp"].size(), 0)[m["dp"].get_local_rank()]


def next_token_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def dp_mean(v: torch.Tensor, m: Any) -> float:
    """The mean over dp ranks of a per-rank scalar: the full-batch loss."""
    t = v.detach().clone()
    dist.all_reduce(t, group=m["dp"].get_group())
    return t.item() / m["dp"].size()


def llama(seed: int = 0, **kw: Any) -> Transformer:
    m = Transformer(config("debug", **kw))
    m.init_weights(seed)
    return m


def train_vs_reference(rank: int, steps: int = 3, lr: float = 1e-3, loaded: bool | str = False,
                       **fsdp: Any) -> dict:
    """``steps`` AdamW steps of the 2-D model (each dp rank half of the batch) and of the
    single-process model (the full batch). Each step's report (this rank's logits rows,
    the loss, every parameter and its local gradient; a float64 copy of the reference as
    it is at that step for the noise allowance), and a report on the parameters after
    the last step. ``loaded``: the 2-D model is made from another init, then given the
    reference's values by ``load_state_dict`` of its full state dict (after a forward
    without backward, which leaves the root's parameters unsharded, where ``loaded`` is
    "after a forward")."""
    m = mesh2d()
    ref = llama()
    par = tpcompile.auto_parallelize(llama(seed=9) if loaded else copy.deepcopy(ref), m, **fsdp)
    if loaded == "after a forward":
        with torch.no_grad():
            par(my_rows(tokens(99, ref.args.vocab_size), m))
    if loaded:
        par.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=lr)
    opt_par = torch.optim.AdamW(par.parameters(), lr=lr)
    tol = RTOL[torch.float32]
    out: dict[str, Any] = {"reports": []}
    for step in range(steps):
        x = tokens(100 + step, ref.args.vocab_size)

        def run(model: nn.Module, ids: torch.Tensor = x) -> tuple:
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            return logits, loss

        sh = shadow(ref, run)  # a float64 copy of the reference as it is at this step
        logits_ref, l_ref = run(ref)
        logits_par, l_par = run(par, my_rows(x, m))
        rep = compare(ref, par, my_rows(logits_ref, m), logits_par,
                      shadow=sh.map_outputs(lambda o: my_rows(o[0], m)),
                      param_rtol=0.0 if step == 0 else tol)
        rep.checks.append(check_tensor("loss", torch.tensor(dp_mean(l_par, m)),
                                       torch.tensor(l_ref.item()), rtol=tol))
        out["reports"].append(rep)
        opt_ref.step()
        opt_par.step()
        opt_ref.zero_grad()
        opt_par.zero_grad()
    pars = dict(par.named_parameters())
    final = Report(rank, out["reports"][0].group, tol)
    final.checks = [check_tensor(n, pars[n], p, kind="param", rtol=tol)
                    for n, p in ref.named_parameters()]
    out["final"] = final
    out["placements"] = {n: [str(pl) for pl in p.placements] for n, p in pars.items()}
    from torch.distributed.fsdp import FSDPModule
    out["fsdp_modules"] = [n for n, mod in par.named_modules() if isinstance(mod, FSDPModule)]
    return out


def meta_vs_full(rank: int, seed: int = 3) -> dict:
    """A meta-built model materialised sharded vs a full model initialised then sharded."""
    m = mesh2d()
    with torch.device("meta"):
        meta_model = Transformer(config("debug"))
    par_meta = tpcompile.auto_parallelize(meta_model, m, seed=seed)
    held = local_param_bytes(par_meta)  # before any forward: the root stays unsharded after one
    par_full = tpcompile.auto_parallelize(llama(seed), m)
    a, b = dict(par_meta.named_parameters()), dict(par_full.named_parameters())
    equal = {n: bool(torch.equal(a[n].to_local(), b[n].to_local())) for n in b}
    same_full = {n: bool(torch.equal(full(a[n]), full(b[n]))) for n in b}
    total = sum(p.numel() * p.element_size() for p in llama(seed).parameters())
    styles = tpcompile.plan_of(par_meta).layer_styles()
    expected = sum(_share(n, p, styles) for n, p in llama(seed).named_parameters())
    x = tokens(7, 512)
    loss_meta = next_token_loss(par_meta, my_rows(x, m)).item()
    loss_full = next_token_loss(par_full, my_rows(x, m)).item()
    return {"equal_local": equal, "equal_full": same_full, "bytes": held,
            "expected": expected, "total": total, "losses": (loss_meta, loss_full),
            "devices": sorted({str(p.to_local().device) for p in par_meta.parameters()})}


def _share(name: str, p: torch.Tensor, styles: dict[str, str]) -> int:
    """Bytes of a full parameter's share on one rank of the 2x2 mesh: split over dp by
    FSDP, and over tp too where the plan shards its layer (all sizes here divide)."""
    tp_split = styles.get(name.rsplit(".", 1)[0]) in ("colwise", "rowwise", "vocab_parallel")
    return p.numel() * p.element_size() // (2 * (2 if tp_split else 1))


def meta_generic_init(rank: int) -> dict:
    """A model without init_weights: reset_parameters per module, same values as the same
    loop on the full model."""
    from models.toy import GatedMLPStack
    m = mesh2d()
    with torch.device("meta"):
        meta_model = GatedMLPStack(dim=32, hidden=64, n_layers=2, bias=True)
    par = tpcompile.auto_parallelize(meta_model, m, seed=11)
    ref = GatedMLPStack(dim=32, hidden=64, n_layers=2, bias=True)
    torch.manual_seed(11)  # the plain loop on the full model
    for mod in ref.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    pars = dict(par.named_parameters())
    return {n: bool(torch.equal(full(pars[n]), p)) for n, p in ref.named_parameters()}


def meta_hf(rank: int, seed: int = 3) -> dict:
    """A Hugging Face Llama built on the meta device, no init_fn: its own
    ``_init_weights`` per module (its ``init_weights()`` takes no seed), parameters and
    the rotary buffers equal to the same loop on the full model, and so is the loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tpcompile.runtime.distribute import by_module
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    m = mesh2d()
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(cfg)
    ids = tokens(5, 512)
    par = tpcompile.auto_parallelize(meta_model, m, example_kwargs={"input_ids": my_rows(ids, m)},
                                     seed=seed)
    with torch.device("meta"):
        ref = LlamaForCausalLM(cfg)
    ref.to_empty(device="cpu")
    by_module(ref, seed, ref._init_weights, buffers=True)
    pars, bufs = dict(par.named_parameters()), dict(par.named_buffers())
    loss = par(input_ids=my_rows(ids, m), labels=my_rows(ids, m)).loss
    return {"params": {n: bool(torch.equal(full(pars[n]), p)) for n, p in ref.named_parameters()},
            "buffers": {n: bool(torch.equal(bufs[n], b)) for n, b in ref.named_buffers()},
            "std": float(ref.model.layers[0].mlp.up_proj.weight.std()),
            "losses": (dp_mean(loss, m), ref(input_ids=ids, labels=ids).loss.item())}

def mixed_precision(rank: int) -> dict:
    """FSDP's mp_policy passes through: blocks compute in bf16, the optimizer keeps f32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    m = mesh2d()
    ref = llama()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), m, mp_policy=policy)
    seen: list[str] = []
    par.layers[0].register_forward_hook(lambda mod, a, out: seen.append(str(out.dtype)))
    x = tokens(100, ref.args.vocab_size)
    loss = next_token_loss(par, my_rows(x, m))
    loss.backward()
    return {"dtypes": sorted(set(seen)), "loss": dp_mean(loss, m),
            "ref": next_token_loss(ref, x).item(),
            "param_dtypes": sorted({str(p.dtype) for p in par.parameters()})}


def bad_option(rank: int) -> dict:
    m = mesh2d()
    model = llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        tpcompile.auto_parallelize(model, m, resharding=True)
        return {"error": "", "untouched": False}
    except tpcompile.TPCompileError as e:
        after = dict(model.named_parameters())
        untouched = (all(type(after[n]) is nn.Parameter and torch.equal(after[n], v)
                         for n, v in before.items())
                     and "forward" not in model.__dict__
                     and type(model) is Transformer)
        return {"error": str(e), "untouched": untouched}


class RawParam(nn.Module):
    """A parameter owned by a module without reset_parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


def _error(fn: Any) -> str:
    try:
        fn()
    except tpcompile.TPCompileError as e:
        return str(e)
    return ""


def meta_errors(rank: int) -> dict:
    m = mesh2d()

    def no_init() -> None:
        with torch.device("meta"):
            model = RawParam()
        tpcompile.auto_parallelize(model, m)

    def lazy_init() -> None:
        with torch.device("meta"):
            model = Transformer(config("debug"))

        def init(mod: nn.Module) -> None:  # forgets output.weight
            mod.init_weights(0)
            mod.output.weight.to_local().fill_(float("nan"))
        tpcompile.auto_parallelize(model, m, init_fn=init)

    def init_fn_on_real() -> None:
        tpcompile.auto_parallelize(llama(), m, init_fn=lambda mod: None)

    return {"no_init": _error(no_init), "lazy_init": _error(lazy_init),
            "init_fn_on_real": _error(init_fn_on_real)}


def meta_1d(rank: int, seed: int = 5) -> dict:
    """The meta path on a 1-D (all tensor parallel) mesh: no FSDP, same weights."""
    from tests.harness import tp_mesh
    with torch.device("meta"):
        meta_model = Transformer(config("debug"))
    a = dict(tpcompile.auto_parallelize(meta_model, tp_mesh(2), seed=seed).named_parameters())
    b = dict(tpcompile.auto_parallelize(llama(seed), tp_mesh(2)).named_parameters())
    return {n: bool(torch.equal(a[n].to_local(), b[n].to_local())) for n in b}
