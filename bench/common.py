"""Shared setup for the benchmarks: the process group and mesh, the Llama model, the two
programs under test (tpcompile and the hand-written ``parallelize_module`` plan), one
training step, a numerics check, and table / JSON output.

The two programs start from the same model (same seed, deep copies), see the same
inputs, and run the same step: forward, cross-entropy loss, backward, AdamW step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

import tpcompile
from tpcompile import verify
from models.llama2 import Transformer, config

PROGRAMS = ("tpcompile", "hand")


# ----------------------------------------------------------------------------- arguments

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--vocab", type=int, default=32000,
                   help="vocabulary size (default 32000, the tutorial's)")
    p.add_argument("--sizes", default="2x64,8x256",
                   help="comma-separated BATCHxSEQ sizes (default 2x64,8x256)")
    p.add_argument("--sp", default="off,on", help="sequence parallel: off, on, or off,on")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel degree of a 2-D (dp, tp) mesh; only 1 for now")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="tutorial",
                   help="tutorial (models/llama2.py), reference (models/reference_llama.py, "
                        "the Llama repo's model code) or hf (transformers' LlamaForCausalLM), "
                        "all dim 256, 16 heads, FFN 768; step_time.py takes a comma-separated "
                        "list")
    p.add_argument("--loss-parallel", action="store_true",
                   help="both programs keep the logits vocab-sharded and compute the "
                        "cross-entropy under torch's loss_parallel() (no logits gather)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both programs (tpcompile's with fullgraph=True; the "
                        "first steps, which compile, are warm-up)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (--compile)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def sizes(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in spec.split(",")]  # type: ignore[misc]


def sp_modes(spec: str) -> list[bool]:
    return [{"off": False, "on": True}[s.strip()] for s in spec.split(",")]


# ----------------------------------------------------------------------------- processes

def init(dp: int = 1, use_loss_parallel: bool = False) -> tuple[DeviceMesh, torch.device]:
    """The process group and the tensor-parallel mesh; CUDA/NCCL when GPUs exist."""
    global LOSS_PARALLEL
    LOSS_PARALLEL = use_loss_parallel
    if dp != 1:
        raise SystemExit("--dp > 1 (a 2-D dp x tp mesh) is not supported by the benchmarks yet")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,), mesh_dim_names=("tp",))
    return mesh, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def device_of(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# ----------------------------------------------------------------------------- the model

MODELS = ("tutorial", "reference", "hf")
MODEL = {"name": "tutorial"}  # --model: one of MODELS


def models(spec: str) -> list[str]:
    out = [m.strip() for m in spec.split(",")]
    bad = [m for m in out if m not in MODELS]
    if bad:
        raise SystemExit(f"--model {', '.join(bad)}: unknown; known: {', '.join(MODELS)}")
    return out


def build_model(layers: int, vocab: int, device: torch.device, seed: int = 0) -> Transformer:
    """The tutorial Llama (dim 256, 16 heads), deterministic weights, on ``device``; with
    ``--model reference`` the reference-style Llama (models/reference_llama.py, the Llama
    repo's model code) of the same size, with ``--model hf`` transformers'
    ``LlamaForCausalLM`` of the same size (built from its config, nothing downloaded)."""
    if MODEL["name"] == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768,
                          num_hidden_layers=layers, num_attention_heads=16,
                          num_key_value_heads=16, max_position_embeddings=512, use_cache=False,
                          tie_word_embeddings=False, attn_implementation="sdpa")
        return LlamaForCausalLM(cfg).to(device)  # type: ignore[return-value]
    if MODEL["name"] == "reference":
        from models import reference_llama as R
        torch.manual_seed(seed)
        ref = R.Transformer(R.ModelArgs(dim=256, n_layers=layers, n_heads=16,
                                        vocab_size=vocab, multiple_of=256, max_seq_len=512))
        return ref.to(device)  # type: ignore[return-value]
    model = Transformer(config("tutorial", n_layers=layers, vocab_size=vocab))
    model.init_weights(seed)
    return model.to(device)


def make_batch(batch: int, seq: int, vocab: int, device: torch.device,
               seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


LOSS_PARALLEL = False  # set from --loss-parallel by init()


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output (transformers returns a ModelOutput)."""
    return out.logits if hasattr(out, "logits") else out


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(logits).flatten(0, 1), targets.flatten())


def loss_context() -> Any:
    """Vocab-sharded logits (DTensor) need PyTorch's loss_parallel() around the loss and
    its backward."""
    return loss_parallel() if LOSS_PARALLEL else contextlib.nullcontext()


def loss_backward(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with loss_context():
        loss = loss_of(logits, targets)
        loss.backward()
    return loss


# ----------------------------------------------------------------------------- the programs

def hand_plan(block_count: int, sp: bool) -> dict[str, Any]:
    """The tutorial / torchtitan Llama plan, with (``sp``) or without sequence parallel."""
    if MODEL["name"] == "hf":
        return hf_hand_plan(block_count, sp)
    if sp:
        plan: dict[str, Any] = {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
            if not LOSS_PARALLEL else ColwiseParallel(input_layouts=Shard(1), use_local_output=False),
        }
    else:
        plan = {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate())
            if not LOSS_PARALLEL else ColwiseParallel(use_local_output=False),
        }
    others = (None,) * (3 if MODEL["name"] == "reference" else 2)
    for i in range(block_count):
        b = f"layers.{i}"
        plan.update({
            f"{b}.attention.wq": ColwiseParallel(), f"{b}.attention.wk": ColwiseParallel(),
            f"{b}.attention.wv": ColwiseParallel(),
            f"{b}.feed_forward.w1": ColwiseParallel(), f"{b}.feed_forward.w3": ColwiseParallel(),
        })
        if sp:
            plan.update({
                f"{b}.attention_norm": SequenceParallel(),
                # the attention's inputs: (x, freqs_cis, mask), the reference's (x,
                # start_pos, freqs_cis, mask)
                f"{b}.attention": PrepareModuleInput(input_layouts=(Shard(1), *others),
                                                     desired_input_layouts=(Replicate(), *others)),
                f"{b}.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                f"{b}.ffn_norm": SequenceParallel(),
                f"{b}.feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                        desired_input_layouts=(Replicate(),)),
                f"{b}.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            })
        else:
            plan.update({f"{b}.attention.wo": RowwiseParallel(),
                         f"{b}.feed_forward.w2": RowwiseParallel()})
    return plan


def hf_hand_plan(block_count: int, sp: bool) -> dict[str, Any]:
    """The same plan for transformers' module names. HF's Llama reads the sequence length
    off the embedding's output (positions, mask), so under SP the embedding and the
    residual stream stay DTensors (global shapes); each attention and MLP gets its input
    replicated and returns sequence shards. Its views use -1 heads: no head counts to
    divide."""
    seq = {"input_layouts": Shard(1)} if sp else {}
    head = ColwiseParallel(output_layouts=Replicate(), **seq) if not LOSS_PARALLEL else \
        ColwiseParallel(use_local_output=False, **seq)
    plan: dict[str, Any] = {"lm_head": head}
    if sp:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(),
                                                     output_layouts=Shard(1),
                                                     use_local_output=False)
        # local output: the model slices it before the head (logits_to_keep), and a
        # compiled backward cannot replay a view of a DTensor (as_strided)
        plan["model.norm"] = SequenceParallel(use_local_output=True)
    else:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
    for i in range(block_count):
        b = f"model.layers.{i}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):
            plan[f"{b}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{b}.{name}"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False) \
                if sp else RowwiseParallel()
        if sp:
            plan.update({
                f"{b}.input_layernorm": SequenceParallel(),
                f"{b}.post_attention_layernorm": SequenceParallel(),
                f"{b}.self_attn": PrepareModuleInput(
                    input_kwarg_layouts={"hidden_states": Shard(1)},
                    desired_input_kwarg_layouts={"hidden_states": Replicate()},
                    use_local_output=True),
                f"{b}.mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                               desired_input_layouts=(Replicate(),),
                                               use_local_output=True),
            })
    return plan


def hand_parallelize(model: Transformer, mesh: DeviceMesh, sp: bool) -> nn.Module:
    """Apply the hand plan. Its colwise q/k/v outputs are local shards, so the attention's
    views must use this rank's head counts, as torchtitan does: divide them by tp."""
    tp = mesh.size()
    if MODEL["name"] == "hf":
        return parallelize_module(model, mesh, hand_plan(len(model.model.layers), sp))
    names = ("n_local_heads", "n_local_kv_heads") if MODEL["name"] == "reference" else \
        ("n_heads", "n_kv_heads")
    for layer in model.layers:
        attn = layer.attention
        heads = [getattr(attn, n) for n in names]
        if any(h % tp for h in heads):
            raise ValueError(f"heads {heads} not divisible by tp={tp}")
        for n, h in zip(names, heads):
            setattr(attn, n, h // tp)
    return parallelize_module(model, mesh, hand_plan(len(model.layers), sp))


def tpc_parallelize(model: Transformer, mesh: DeviceMesh, sp: bool) -> nn.Module:
    example = None
    if MODEL["name"] == "hf":  # transformers' forward takes many optional arguments
        example = (torch.zeros(2, 64, dtype=torch.long, device=device_of(mesh)),)
    return tpcompile.auto_parallelize(model, mesh, example_inputs=example, sequence_parallel=sp,
                                      loss_parallel=LOSS_PARALLEL)


def tpc_serial(model: Transformer, mesh: DeviceMesh, sp: bool) -> nn.Module:
    """tpcompile's program without the backward overlap (each input-gradient reduction
    waited on at once, before the weight gradients): what the overlap buys."""
    from tpcompile.rewrite.overlap import overlapping
    with overlapping(False):
        return tpc_parallelize(model, mesh, sp)


PARALLELIZE: dict[str, Callable[[Transformer, DeviceMesh, bool], nn.Module]] = {
    "tpcompile": tpc_parallelize, "hand": hand_parallelize, "tpcompile-serial": tpc_serial,
}


@dataclass
class Program:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    run: Callable[..., Any] | None = None  # the compiled model, with --compile


def programs(ref: Transformer, mesh: DeviceMesh, sp: bool, compile_backend: str | None = None,
             names: tuple[str, ...] = PROGRAMS) -> list[Program]:
    """Both programs, each on its own deep copy of ``ref``, each with its own AdamW;
    with ``compile_backend`` each also compiled (tpcompile's with fullgraph=True, which
    fails loudly on a graph break; the hand plan's DTensor program as it comes)."""
    out = []
    for name in names:
        m = PARALLELIZE[name](copy.deepcopy(ref), mesh, sp)
        run = None
        if compile_backend:
            run = torch.compile(m, backend=compile_backend, fullgraph=name.startswith("tpcompile"))
        out.append(Program(name, m, torch.optim.AdamW(m.parameters(), lr=1e-4), run))
    return out


def step(p: Program, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One training step: forward, loss, backward, optimizer step (grads freed first)."""
    p.opt.zero_grad(set_to_none=True)
    loss = loss_backward((p.model if p.run is None else p.run)(tokens), targets)
    p.opt.step()
    return loss.detach()


# ----------------------------------------------------------------------------- numerics

def check_numerics(ref: nn.Module, par: nn.Module, tokens: torch.Tensor,
                   targets: torch.Tensor, run: Callable[..., Any] | None = None
                   ) -> dict[str, Any]:
    """``par`` against ``ref`` with ``tpcompile.verify``, on every rank: the logits and
    every parameter's local gradient (``ref`` is run here too; both get their grads
    cleared after); ``run``: call that instead of ``par`` (its compiled version, which
    is what a compiled bench times). The hand plan leaves its sequence-parallel norms' gradients
    ``Partial`` and its embedding's ``Replicate``, for its optimizer step to put right;
    that is done here as the step would (a tpcompile module must need no such help).
    Returns the worst relative errors and every problem found on any rank (empty: the
    numbers match)."""
    if run is not None:  # planned at this size eagerly first: fullgraph cannot plan
        with torch.no_grad():
            par(tokens)
    out_ref, out_par = logits_of(ref(tokens)), logits_of((par if run is None else run)(tokens))
    loss_of(out_ref, targets).backward()
    loss_backward(out_par, targets)
    ours = "_tpcompile_plan" in par.__dict__
    if not ours:
        verify.align_grads(par)
    rep = verify.compare(ref, par, out_ref, out_par, placements="plan" if ours else None,
                         dtensor_outputs=LOSS_PARALLEL)
    reports = verify.gather(rep)
    worst, worst_name = 0.0, "-"
    for r in reports:
        for name, e in r.errors("grad").items():
            if e > worst:
                worst, worst_name = e, name
    res = {"output": max(e for r in reports for e in r.errors("output").values()),
           "grad": worst, "worst_grad": worst_name, "problems": verify.verdict(reports)}
    ref.zero_grad(set_to_none=True)
    par.zero_grad(set_to_none=True)
    return res


def require_close(name: str, errs: dict) -> None:
    if errs["problems"]:
        raise SystemExit(f"{name} does not compute the unsharded model's numbers:\n  "
                         + "\n  ".join(errs["problems"][:20]))


# ----------------------------------------------------------------------------- output

def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio_interval(a: list[float], b: list[float], level: float = 0.90,
                   resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval for median(a) / median(b), where a[i] and b[i] were timed as a
    pair (the programs alternate step by step, so a pair shares the machine's state):
    the pairs are resampled together. Wide when the machine is noisy; a target inside it
    is not decided by the run."""
    n = min(len(a), len(b))
    if n < 2:
        return float("nan"), float("nan")
    ta = torch.tensor(a[:n], dtype=torch.float64)
    tb = torch.tensor(b[:n], dtype=torch.float64)
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    ratios = ta[idx].quantile(0.5, dim=1) / tb[idx].quantile(0.5, dim=1)  # as median() does
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                 dtype=torch.float64)).tolist()
    return lo, hi


def interval(a: list[float], b: list[float]) -> dict[str, Any]:
    """A row's fields for ``ratio_interval(a, b)``: its ends, and as the tables print it."""
    lo, hi = ratio_interval(a, b)
    return {"ratio_lo": lo, "ratio_hi": hi, "ratio_ci": f"{lo:.3f}-{hi:.3f}"}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``columns`` are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if f else str(r[k]) for k, _, f in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body])


def emit(meta: dict, rows: list[dict], columns: list[tuple[str, str, str]], as_json: bool) -> None:
    if not rank0():
        return
    if as_json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        print(" ".join(f"{k}={v}" for k, v in meta.items()))
        print(table(rows, columns))


def machine() -> dict:
    d = {"torch": torch.__version__, "world": dist.get_world_size() if dist.is_initialized() else 1,
         "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    return d
