"""Jobs on models this project did not write: Hugging Face families built offline from
their config classes, the reference-style Llama and the nanoGPT-style GPT.

Every job compares the parallel model with the unsharded one on *this* rank: the whole
output structure (ModelOutput fields, tuples), and every parameter's gradient, with its
placements checked (nothing left ``Partial``) and no global floor on the error.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor.placement_types import _StridedShard

import tpcompile
from tests.harness import mesh, raised, tp_mesh
from tpcompile.verify import full

TOL = 5e-5  # float32, relative (see README: numerics)


@contextlib.contextmanager
def head_in_chunks(ref: nn.Module, rows: int, chunks: int, p2p: bool | None = None
                   ) -> Iterator[None]:
    """Inside: a colwise head over ``rows`` rows of ``ref``'s vocabulary computes and
    gathers its logits in ``chunks`` chunks of rows, as large logits are (0: unchanged);
    with ``p2p`` True each chunk (on gloo) is gathered by sends and receives, as a large
    chunk is, False by the one all-gather, as a small one is (None: by its size)."""
    from tpcompile.rewrite import head as H
    saved, saved_p2p = dict(H.HEAD_CHUNKS), H.P2P_GATHER_BYTES
    if chunks:  # the bytes of the gathered logits (float32) per chunk; any rows
        H.HEAD_CHUNKS.update(bytes=rows * ref.config.vocab_size * 4 // chunks, rows=1)
    if p2p is not None:
        H.P2P_GATHER_BYTES = 0 if p2p else 1 << 62
    try:
        yield
    finally:
        H.HEAD_CHUNKS.update(saved)
        H.P2P_GATHER_BYTES = saved_p2p


class LoraLinear(nn.Module):
    """A LoRA adapter as PEFT writes one around a Linear: ``base(x) + B(A(x)) * scaling``,
    the base frozen, A (in -> r) and B (r -> out) trained; B starts nonzero here so
    every gradient is exercised."""

    def __init__(self, base: nn.Linear, r: int = 4, alpha: int = 8) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


# fine-tuning heads: family -> number of labels (Llama classifies a sequence by its last
# token that is not padding; BERT labels each token)
TASK_LABELS = {"llama_seq_cls": 3, "bert_token_cls": 5}
_MODEL_PREFIX = {"llama": "Llama", "bert": "Bert"}


def build(family: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, tuple, dict]:
    """A model and its keyword inputs, identical on every rank."""
    torch.manual_seed(seed)
    if family == "reference_llama":
        import dataclasses
        from models import reference_llama as R
        m = R.Transformer(dataclasses.replace(R.CONFIGS["tiny"], **overrides))
        return m, (), R.example_inputs("tiny", 4, 8)
    if family == "nanogpt":
        from models import nanogpt as G
        cfg = G.CONFIGS["tiny"]
        m = G.GPT(G.GPTConfig(**{**cfg.__dict__, **overrides}) if overrides else cfg)
        return m, (), G.example_inputs("tiny", 4, 8)
    if family in ("vit", "vit_reg"):
        from models import vit as V
        name = "tiny-reg" if family == "vit_reg" else "tiny"
        return V.build(name, **overrides), (), V.example_inputs(name, 4)
    if family in ("gpt_fast", "gpt_fast_gqa"):
        from models import gpt_fast as F
        name = "tiny-gqa" if family == "gpt_fast_gqa" else "tiny"
        return F.build(name, **overrides), (), F.example_inputs(name, 4, 8)
    if family == "olmo_ai2":
        from models import olmo_ai2 as O
        return O.build("tiny", **overrides), (), O.example_inputs("tiny", 4, 8)
    if family == "mpt_foundry":
        from models import mpt_foundry as M
        return M.build("tiny", **overrides), (), M.example_inputs("tiny", 4, 8)
    from models import hf_zoo
    if family in TASK_LABELS:  # a classifier head in place of the LM head
        import transformers
        base, task = family.split("_", 1)
        cfg = hf_zoo.config(base, num_labels=TASK_LABELS[family])
        cls = {"seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification"}[task]
        m = getattr(transformers, _MODEL_PREFIX[base] + cls)(cfg)
        kwargs = hf_zoo.example_inputs(base, 4, 8)
        g = torch.Generator().manual_seed(seed)
        shape = (4,) if task == "seq_cls" else (4, 8)
        kwargs["labels"] = torch.randint(0, TASK_LABELS[family], shape, generator=g)
        return m.train(), (), kwargs
    if family == "llama_lora":  # PEFT's shape: frozen base, a trainable low-rank pair
        m = hf_zoo.build("llama", **overrides)
        m.requires_grad_(False)
        for layer in m.model.layers:
            for name in ("q_proj", "v_proj"):
                setattr(layer.self_attn, name, LoraLinear(getattr(layer.self_attn, name)))
        return m, (), hf_zoo.example_inputs("llama", 4, 8)
    if family == "olmo2_torch_norms":  # q/k norms as torch's nn.RMSNorm (aten.rms_norm)
        m = hf_zoo.build("olmo2", **overrides)
        for layer in m.model.layers:
            for name in ("q_norm", "k_norm"):
                size = getattr(layer.self_attn, name).weight.shape[0]
                norm = nn.RMSNorm(size, eps=1e-6)
                nn.init.uniform_(norm.weight, 0.5, 1.5)  # not all ones: a wrong slice shows
                setattr(layer.self_attn, name, norm)
        return m, (), hf_zoo.example_inputs("olmo2", 4, 8)
    m = hf_zoo.build(family, **overrides)
    return m, (), hf_zoo.example_inputs(family, 4, 8)


def _err(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor | None = None) -> float:
    """max |a - b| / max |b|, per tensor, no global floor; exact agreement required where
    the reference is all zeros. With ``exact`` (the float64 reference), a value that is
    zero in exact arithmetic (a key bias: softmax ignores a shift of all scores) is
    measured against the float32 reference's own error, not against its noise."""
    a, b = full(a).detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if not b.numel():
        return 0.0
    scale = b.abs().max().item()
    if exact is not None:  # plus the float32 reference's own error, ten times, in TOL units
        scale += 10 / TOL * (b - exact.double()).abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _leaves(out: Any) -> dict[str, Any]:
    """Every field of an output structure, by path (ModelOutput, tuples, dicts)."""
    import torch.utils._pytree as pytree
    flat, _ = pytree.tree_flatten_with_path(out)
    return {pytree.keystr(p): v for p, v in flat}


def loss_of(out: Any) -> torch.Tensor:
    """The model's own loss where it computes one, else a weighted sum of the logits."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, tuple) and len(out) == 2 and out[1] is not None:
        loss = out[1]
    if loss is not None:
        return loss
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    w = torch.linspace(0.5, 1.5, logits.shape[-1], dtype=logits.dtype)
    return (logits.float().pow(2) * w).mean()


def judge(ref: nn.Module, par: nn.Module, out_ref: Any, out_par: Any,
          dp: int = 1, exact: dict[str, torch.Tensor] | None = None,
          unread: frozenset[str] = frozenset()) -> dict:
    """This rank's verdict: output fields and every gradient against the reference.
    ``unread``: parameters the call does not read, without a gradient on both sides."""
    lr, lp = _leaves(out_ref), _leaves(out_par)
    problems: list[str] = []
    if set(lr) != set(lp):
        problems.append(f"output fields differ: {sorted(set(lr) ^ set(lp))}")
    outputs = {}
    for k, v in lr.items():
        w = lp.get(k)
        if isinstance(v, torch.Tensor):
            if type(w) is not torch.Tensor:
                problems.append(f"output {k} is {type(w).__name__}, not a plain tensor")
                continue
            outputs[k] = _err(w, v) if dp == 1 else 0.0
        elif v != w:
            problems.append(f"output {k}: {w!r} != {v!r}")
    grads, sharded, total = {}, 0, 0
    ref_params = dict(ref.named_parameters())
    par_params = dict(par.named_parameters())
    if set(ref_params) != set(par_params):
        problems.append(f"parameter names differ: {sorted(set(ref_params) ^ set(par_params))}")
    for name, p in ref_params.items():
        q = par_params.get(name)
        if q is None:
            continue
        total += p.numel()
        if isinstance(q, DTensor) and any(pl.is_shard() or isinstance(pl, _StridedShard)
                                          for pl in q.placements[-1:]):
            sharded += p.numel()
        if name in unread or not p.requires_grad:  # frozen: no gradient on either side
            if p.grad is not None or q.grad is not None or q.requires_grad != p.requires_grad:
                problems.append(f"{name}: unread by the call or frozen, yet it has a gradient")
            continue
        if p.grad is None:
            problems.append(f"{name}: the reference has no gradient (a useless comparison)")
            continue
        if q.grad is None:
            problems.append(f"{name}: no gradient in the parallel model")
            continue
        if isinstance(q.grad, DTensor) and any(isinstance(pl, Partial) for pl in q.grad.placements):
            problems.append(f"{name}: gradient left Partial {q.grad.placements}")
            continue
        grads[name] = _err(q.grad, p.grad, (exact or {}).get(name))
    return {"outputs": outputs, "grads": grads, "problems": problems,
            "sharded": sharded / max(total, 1), "rank": dist.get_rank()}


def numerics(rank: int, family: str, tp: int, sp: bool, overrides: dict | None = None,
             shapes: list[tuple[int, int]] | None = None, padding: bool = False) -> list[dict]:
    """Parallelize on (4, 8) inputs, then compare at each (batch, seq) in ``shapes``."""
    import warnings
    ref, args, kwargs = build(family, **(overrides or {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                         example_kwargs=kwargs, sequence_parallel=sp)
    said = [str(w.message) for w in caught if str(w.message).startswith("tpcompile")]
    ref64 = copy.deepcopy(ref).double()
    if getattr(getattr(ref64, "config", None), "_experts_implementation", None) not in (None, "eager"):
        ref64.config._experts_implementation = "eager"  # grouped_mm takes no float64
    out = []
    for batch, seq in shapes or [(4, 8)]:
        kw = _inputs(family, kwargs, batch, seq, padding)
        for m in (ref, par, ref64):
            m.zero_grad(set_to_none=True)
        o_ref, o_par = ref(*args, **kw), par(*args, **kw)
        loss_of(o_ref).backward()
        loss_of(o_par).backward()
        kw64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in kw.items()}  # images in float64 too
        loss_of(ref64(*args, **kw64)).backward()
        exact = {n: p.grad for n, p in ref64.named_parameters() if p.grad is not None}
        notes = [f"{n.layer}: {n.reason}" for n in tpcompile.plan_of(par).notes()]
        programs = len(par.__dict__["_tpcompile_runtime"].programs)
        out.append(dict(judge(ref, par, o_ref, o_par, exact=exact), shape=(batch, seq),
                        notes=notes, programs=programs, warnings=said,
                        styles=tpcompile.plan_of(par).layer_styles()))
    return out


def judged(rank: int, family: str, tp: int, sp: bool, overrides: dict | None = None) -> dict:
    """tpcompile's own judge on every rank (``verify.compare`` against a float64 shadow):
    outputs, every parameter's local shard against its slice of the reference under the
    placement the plan names, every gradient with that placement; plus the placements
    and the plan's notes."""
    import warnings

    from tpcompile import verify
    ref, args, kwargs = build(family, **(overrides or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                         example_kwargs=kwargs, sequence_parallel=sp)

    def step(m: nn.Module) -> Any:
        kw = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in kwargs.items()}
        out = m(*args, **kw)
        loss_of(out).backward()
        return out.logits
    ref64 = copy.deepcopy(ref)
    if getattr(ref64.config, "_experts_implementation", None) not in (None, "eager"):
        ref64.config._experts_implementation = "eager"  # grouped_mm takes no float64
    sh = verify.shadow(ref64, step)
    o_ref, o_par = ref(*args, **kwargs), par(*args, **kwargs)
    loss_of(o_ref).backward()
    loss_of(o_par).backward()
    rep = verify.compare(ref, par, o_ref.logits, o_par.logits, shadow=sh)
    return {"verdict": verify.verdict(verify.gather(rep)),
            "placements": {n: str(p.placements[-1]) for n, p in par.named_parameters()},
            "notes": [f"{n.layer}: {n.reason}" for n in tpcompile.plan_of(par).notes()]}


def load_full(rank: int, family: str, tp: int) -> dict:
    """``load_state_dict`` of another model's full (unsharded) state dict into the
    parallel model, as into the unsharded one: the parallel model then computes what that
    model computes (tpcompile's judge on every rank: outputs, every parameter's shard
    against its slice of it, every gradient); the caller's dict untouched; a tensor of
    the wrong shape refused by torch's size-mismatch error naming it."""
    import warnings

    from tpcompile import verify
    ref, args, kwargs = build(family)
    other = build(family, seed=1)[0]  # the same structure, other values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                         example_kwargs=kwargs)
    given = other.state_dict()
    before = {k: v.clone() for k, v in given.items()}
    loaded = str(par.load_state_dict(given))
    untouched = all(type(given[k]) is torch.Tensor and torch.equal(given[k], v)
                    for k, v in before.items())
    sharded = next(n for n, p in par.named_parameters()
                   if isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements))
    bad = dict(given)
    bad[sharded] = torch.zeros(given[sharded].shape[0] + 1, *given[sharded].shape[1:])
    try:
        par.load_state_dict(bad)
        mismatch = "loaded"
    except RuntimeError as e:
        mismatch = str(e)
    par.load_state_dict(given)  # (what the failed load did copy is the same values)

    def step(m: nn.Module) -> Any:
        out = m(*args, **kwargs)
        loss_of(out).backward()
        return out.logits
    sh = verify.shadow(other, step)
    o_ref, o_par = other(*args, **kwargs), par(*args, **kwargs)
    loss_of(o_ref).backward()
    loss_of(o_par).backward()
    rep = verify.compare(other, par, o_ref.logits, o_par.logits, shadow=sh)
    return {"verdict": verify.verdict(verify.gather(rep)), "loaded": loaded,
            "untouched": untouched, "sharded": sharded, "mismatch": mismatch,
            "differs": not torch.equal(full(dict(par.named_parameters())[sharded]),
                                       ref.state_dict()[sharded])}


def captured_outputs(rank: int) -> dict:
    """transformers 5's output-capturing hooks. A Llama (eager attention) called once
    with output_attentions and output_hidden_states before auto_parallelize carries those
    hooks for good (on its attention modules and decoder layers); it is parallelized all
    the same and serves output_hidden_states (collected at the decoder layers, which stay
    blocks) and output_attentions (collected inside them: those calls trace the decoder
    layers inline), each judged (every hidden state or attention map, the logits, every
    gradient), then still serves plain calls. A config flag changed after planning is
    refused at the next call that does not give it."""
    ref, args, kwargs = build("llama", attn_implementation="eager")
    ids = kwargs["input_ids"]
    ref(input_ids=ids, output_attentions=True, output_hidden_states=True)  # the hooks, for good
    hooked = sum(len(m._forward_hooks) for m in ref.modules())
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs={"input_ids": ids})
    verdicts = {}
    for flag in ("output_hidden_states", "output_attentions"):
        asked = {flag: True, "labels": ids}
        o_ref, o_par = ref(input_ids=ids, **asked), par(input_ids=ids, **asked)
        loss_of(o_ref).backward()
        loss_of(o_par).backward()
        verdicts[flag] = judge(ref, par, o_ref, o_par)
        ref.zero_grad(set_to_none=True)
        par.zero_grad(set_to_none=True)
    plain = _err(par(input_ids=ids).logits, ref(input_ids=ids).logits)
    par.config.output_hidden_states = True  # after planning: would be ignored
    config_after = raised(lambda: par(input_ids=ids))
    given = _err(par(input_ids=ids, output_hidden_states=False).logits,  # the call's wins
                 ref(input_ids=ids).logits)
    par.config.output_hidden_states = False
    par.config.pad_token_id = ref.config.pad_token_id = 3  # a causal LM never reads it
    pad_set = _err(par(input_ids=ids).logits, ref(input_ids=ids).logits)
    return {"hooked": hooked, "verdicts": verdicts, "plain": plain,
            "config_after": config_after, "given": given, "pad_set": pad_set,
            "hidden_states": len(par(input_ids=ids, output_hidden_states=True).hidden_states)}


def _inputs(family: str, like: dict, batch: int, seq: int, padding: bool) -> dict:
    """Inputs of the same structure as ``like`` at another batch and sequence length."""
    g = torch.Generator().manual_seed(batch * 100 + seq)
    vocab = 128
    out = {}
    for k, v in like.items():
        if k == "attention_mask":
            mask = torch.ones(batch, seq, dtype=v.dtype)
            if padding:  # left padding on every other row, as a batched generate pads
                mask[::2, : seq // 4] = 0
            out[k] = mask
        elif isinstance(v, torch.Tensor) and v.is_floating_point():  # images: batch only
            out[k] = torch.randn(batch, *v.shape[1:], generator=g)
        elif k == "labels" and family in TASK_LABELS:  # class ids, per sequence or token
            out[k] = torch.randint(0, TASK_LABELS[family], (batch, seq)[:v.dim()], generator=g)
        elif isinstance(v, torch.Tensor):
            out[k] = torch.randint(0, vocab, (batch, seq), generator=g)
        else:
            out[k] = v
    if "labels" in out and padding and "attention_mask" in out:
        out["labels"] = out["labels"].masked_fill(out["attention_mask"] == 0, -100)
    return out


def fsdp_numerics(rank: int, family: str, overrides: dict | None = None) -> dict:
    """dp 2 x tp 2: FSDP2 on dp, each dp rank its half of the batch."""
    m = mesh((2, 2), ("dp", "tp"))
    ref, args, kwargs = build(family, **(overrides or {}))
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), m, example_inputs=args,
                                     example_kwargs=kwargs)
    dp, me = m["dp"].size(), m["dp"].get_local_rank()
    mine = {k: v.chunk(dp, 0)[me] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    o_ref, o_par = ref(**kwargs), par(**mine)
    loss_of(o_ref).backward()
    loss_par = loss_of(o_par)
    loss_par.backward()
    verdict = judge(ref, par, o_ref, o_par, dp=dp)
    total = loss_par.detach().clone()
    dist.all_reduce(total, group=m["dp"].get_group())
    verdict["outputs"] = {"loss": _err(total / dp, loss_of(o_ref))}
    return verdict


def planned_inline_then_plain(rank: int, family: str, overrides: dict, flag: str) -> dict:
    """Planned on a call asking for ``flag`` (its decoder layers computed inline in the
    root's program), then called without it: the re-plan gives the decoder layers programs
    of their own, which read their parameters as the root's plan sharded them. Judged
    (outputs and every gradient) on the flagged call, then on the plain one."""
    ref, args, kwargs = build(family, **overrides)
    kwargs = {**kwargs, flag: True}
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs)
    verdicts = []
    for asked in (True, False):
        kw = {**kwargs, flag: asked}
        o_ref, o_par = ref(**kw), par(**kw)
        loss_of(o_ref).backward()
        loss_of(o_par).backward()
        verdicts.append(judge(ref, par, o_ref, o_par))
        ref.zero_grad(set_to_none=True)
        par.zero_grad(set_to_none=True)
    return {"verdicts": verdicts, "programs": len(par.__dict__["_tpcompile_runtime"].programs)}


def per_block_lost(rank: int) -> dict:
    """Decoder layers computed inline for router logits are not blocks: checkpointing
    asked for them is refused at planning (it was refused as "no blocks"), transformers'
    checkpointing not applying is said (it was dropped in silence), and a later call that
    computes checkpointed blocks inline says they keep their activations."""
    import warnings
    ref, _, kwargs = build("mixtral", output_router_logits=True)
    asked = raised(lambda: tpcompile.auto_parallelize(
        copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs, activation_checkpointing="block"))
    hf = copy.deepcopy(ref)
    hf.gradient_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpcompile.auto_parallelize(hf, tp_mesh(2), example_kwargs=kwargs)
    said_hf = [str(w.message) for w in caught if "gradient checkpointing" in str(w.message)]
    plain = copy.deepcopy(ref)
    plain.config.output_router_logits = False
    par = tpcompile.auto_parallelize(plain, tp_mesh(2), example_kwargs=kwargs | {
        "output_router_logits": False}, activation_checkpointing="block")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        par(**kwargs, output_router_logits=True)
    said_late = [str(w.message) for w in caught if "not checkpointed" in str(w.message)]
    return {"asked": asked, "said_hf": said_hf, "said_late": said_late}


def router_logits_later_under_fsdp(rank: int) -> dict:
    """dp 2 x tp 2, planned without router logits: a call asking for them would compute
    the decoder layers (FSDP2's units) inline, where FSDP2's hooks do not run. Refused;
    the next plain call is served as before."""
    m = mesh((2, 2), ("dp", "tp"))
    ref, args, kwargs = build("mixtral")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), m, example_kwargs=kwargs)
    dp, me = m["dp"].size(), m["dp"].get_local_rank()
    mine = {k: v.chunk(dp, 0)[me] for k, v in kwargs.items()}
    later = raised(lambda: par(**mine, output_router_logits=True))
    total = loss_of(par(**mine)).detach().clone()
    dist.all_reduce(total, group=m["dp"].get_group())
    return {"later": later, "plain": _err(total / dp, loss_of(ref(**kwargs)))}


def plan_fraction(rank: int, family: str, tp: int) -> dict:
    """Planning only: the share of parameters a tp plan shards."""
    ref, args, kwargs = build(family)
    styles = tpcompile.plan(ref, tp=tp, example_inputs=args, example_kwargs=kwargs).layer_styles()
    return {"styles": styles}


def collective_counts(rank: int, family: str, tp: int, sp: bool, n_layers: int) -> dict:
    """Collectives by kind (count and bytes) in one forward and one backward."""
    from tpcompile.counting import CollectiveCounter
    layers = {"n_layers": n_layers} if family == "reference_llama" else {"num_hidden_layers": n_layers}
    ref, args, kwargs = build(family, **layers)
    par = tpcompile.auto_parallelize(ref, tp_mesh(tp), example_inputs=args,
                                     example_kwargs=kwargs, sequence_parallel=sp)
    with CollectiveCounter() as fwd:
        out = par(*args, **kwargs)
    with CollectiveCounter() as bwd:
        loss_of(out).backward()
    return {"fwd": dict(fwd.counts), "bwd": dict(bwd.counts),
            "fwd_bytes": dict(fwd.bytes), "bwd_bytes": dict(bwd.bytes)}


class NoRuleScale(torch.nn.Module):
    """A block whose attention output goes through a custom op tpcompile has no rule for."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(d)
        self.wq, self.wk, self.wv, self.wo = (torch.nn.Linear(d, d) for _ in range(4))
        self.w1, self.w2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm(x)
        q, k, v = (w(h).view(b, s, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = torch.ops.tpcompile_test.scale(o)  # no rule: this segment must stay replicated
        x = x + self.wo(o.transpose(1, 2).reshape(b, s, -1))
        return x + self.w2(torch.relu(self.w1(self.norm(x))))


@torch.library.custom_op("tpcompile_test::scale", mutates_args=())
def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


@_scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_scale.register_autograd(lambda ctx, g: g * 1.5)


def no_rule(rank: int) -> dict:
    """A custom op without a rule: a warning naming the op, the layer and the line; the
    segment replicated; the numbers right; no collective for it."""
    import warnings
    from tpcompile.counting import CollectiveCounter

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([NoRuleScale(), NoRuleScale()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    ref = Stack()
    x = torch.randn(2, 8, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_inputs=(x,),
                                         sequence_parallel=False)
    plan = tpcompile.plan_of(par)
    with CollectiveCounter() as c:
        o_par = par(x)
        loss_of(o_par).backward()
    ref64 = copy.deepcopy(ref).double()
    o_ref = ref(x)
    loss_of(o_ref).backward()
    loss_of(ref64(x.double())).backward()
    verdict = judge(ref, par, o_ref, o_par, exact={n: p.grad for n, p in ref64.named_parameters()})
    return {**verdict, "warnings": [str(w.message) for w in caught],
            "styles": plan.layer_styles(), "notes": [n.reason for n in plan.notes()],
            "collectives": dict(c.counts)}


def optional_args(rank: int) -> list[dict]:
    """Planned with labels; called without them, with and without a mask, with
    ``inputs_embeds`` in place of the ids (the embedding unread: a program without it), in
    eval mode: each call structure gets its program on first use, each matches the
    original."""
    ref, args, kwargs = build("llama")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs)
    ids = kwargs["input_ids"]
    embeds = torch.randn(*ids.shape, ref.config.hidden_size, generator=torch.Generator().manual_seed(3))
    calls = [{"input_ids": ids}, {"input_ids": ids, "attention_mask": kwargs["attention_mask"]},
             {"input_ids": ids, "labels": ids, "attention_mask": None},
             {"inputs_embeds": embeds, "labels": ids}, kwargs]
    out = []
    for mode in ("train", "eval"):
        for m in (ref, par):
            m.train(mode == "train")
        for kw in calls:
            if mode == "eval" and "inputs_embeds" in kw:  # (once is enough)
                continue
            for m in (ref, par):
                m.zero_grad(set_to_none=True)
            o_ref, o_par = ref(**kw), par(**kw)
            loss_of(o_ref).backward()
            loss_of(o_par).backward()
            unread = frozenset({"model.embed_tokens.weight"} if "inputs_embeds" in kw else ())
            out.append(dict(judge(ref, par, o_ref, o_par, unread=unread), shape=(mode, sorted(kw))))
    return out


def embeds_tied(rank: int) -> dict:
    """A Llama with tied embeddings, planned on ids, called with ``inputs_embeds``: the
    embedding is not called, its weight still read by the tied head (sharded as planned)."""
    ref, args, kwargs = build("llama", tie_word_embeddings=True)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs)
    ids = kwargs["input_ids"]
    embeds = torch.randn(*ids.shape, ref.config.hidden_size, generator=torch.Generator().manual_seed(3))
    kw = {"inputs_embeds": embeds, "labels": ids}
    o_ref, o_par = ref(**kw), par(**kw)
    loss_of(o_ref).backward()
    loss_of(o_par).backward()
    return dict(judge(ref, par, o_ref, o_par), styles=tpcompile.plan_of(par).layer_styles())


def already_parallel(rank: int) -> dict:
    """A model parallelize_module already made DTensor: refused, model untouched."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    ref, args, kwargs = build("llama")
    model = parallelize_module(copy.deepcopy(ref), tp_mesh(2),
                               {"model.layers.0.mlp.gate_proj": ColwiseParallel()})
    before = {n: type(p) for n, p in model.named_parameters()}
    try:
        tpcompile.auto_parallelize(model, tp_mesh(2), example_kwargs=kwargs)
    except tpcompile.TPCompileError as e:
        return {"error": type(e).__name__, "message": str(e),
                "untouched": before == {n: type(p) for n, p in model.named_parameters()}
                and "forward" not in model.__dict__}
    return {"error": None}


def no_grad_region(rank: int) -> dict:
    """A statistic computed under torch.no_grad() inside forward: no gradient reaches
    what it was computed from, in the parallel model as in the original."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stat = torch.nn.Linear(16, 16)
            self.w1, self.w2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                scale = self.stat(x).abs().mean()
            return self.w2(torch.relu(self.w1(x))) * scale

    torch.manual_seed(0)
    ref, x = Scaled(), torch.randn(2, 8, 16)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_inputs=(x,))
    o_ref, o_par = ref(x), par(x)
    loss_of(o_ref).backward()
    loss_of(o_par).backward()
    ok = par.stat.weight.grad is None and ref.stat.weight.grad is None
    for m in (ref, par):  # the judge wants a gradient for each parameter it compares
        m.stat.weight.grad = torch.zeros_like(m.stat.weight)
        m.stat.bias.grad = torch.zeros_like(m.stat.bias)
    return {**judge(ref, par, o_ref, o_par), "no_grad_kept": ok,
            "styles": tpcompile.plan_of(par).layer_styles()}
