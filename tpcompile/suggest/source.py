"""The model to price: an ``nn.Module`` (meta is fine) or a Hugging Face config, planned
once per model, dtype and length class, and remembered."""

from __future__ import annotations

import json
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import IndivisibleError, TPCompileError
from ..frontend import skeleton
from ..planning import compile_model, synthesize_inputs
from .facts import ModelFacts, flat_styles, lone_layers, mode_facts
from .terms import B0

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Inputs = Callable[[int, int], Any]  # (batch, seq) -> args tuple or kwargs dict

_FACTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_BUILT: dict[str, nn.Module] = {}


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TPCompileError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def as_module(model: Any) -> tuple[nn.Module, str]:
    """(module, label): a module as given; a ``PretrainedConfig``, a config dict, or a
    ``config.json`` path (or a folder holding one) as its causal LM on the meta device."""
    if isinstance(model, nn.Module):
        return model, type(model).__name__
    if isinstance(model, (str, Path)):
        path = Path(model)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise TPCompileError(f"{model}: no such config.json (or folder holding one)")
        data = json.loads(path.read_text())
    elif isinstance(model, dict):
        data = dict(model)
    elif hasattr(model, "to_dict") and hasattr(model, "model_type"):
        data = model.to_dict()
    else:
        raise TPCompileError(f"suggest takes an nn.Module, a Hugging Face config, a config dict "
                             f"or a config.json path; got {type(model).__name__}")
    key = json.dumps(data, sort_keys=True, default=str)
    if key not in _BUILT:
        try:
            import transformers
        except ImportError as e:
            raise TPCompileError("a Hugging Face config needs transformers: pip install "
                                 "'tpcompile[hf]'") from e
        if "model_type" not in data:
            raise TPCompileError("the config has no model_type; is it a Hugging Face config?")
        config = transformers.AutoConfig.for_model(**data)
        config.use_cache = False
        with torch.device("meta"):
            _BUILT[key] = transformers.AutoModelForCausalLM.from_config(config)
    m = _BUILT[key]
    return m, f"{type(m).__name__} ({data.get('model_type')})"


def _call(model: nn.Module, batch: int, seq: int, inputs: Inputs | None) -> dict:
    if inputs is not None:
        made = inputs(batch, seq)
        return {"example_kwargs": made} if isinstance(made, dict) else {"example_inputs": tuple(made)}
    if hasattr(model, "config") and hasattr(model, "main_input_name"):  # transformers
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        return {"example_kwargs": {model.main_input_name: ids}}
    return {"example_inputs": synthesize_inputs(model, batch=batch, seq=seq)}


def example_length(model: nn.Module, tp: int, seq_len: int) -> int:
    """A multiple of ``tp`` no longer than ``seq_len`` (the model takes that) that neither it
    nor ``B0`` times it is a parameter dim: its dims mark the sequence in every shape."""
    dims = {d for p in [*model.parameters(), *model.buffers()] for d in p.shape}
    for prime in (37, 31, 13, 11, 5, 3, 1):
        s0 = tp * prime
        if s0 <= seq_len and s0 not in dims and B0 * s0 not in dims:
            return s0
    return tp


def facts_for(model: nn.Module, name: str, tp: int, s0: int, dtype: str,
              inputs: Inputs | None = None) -> ModelFacts:
    """Plan ``model`` at ``tp`` with and without sequence parallelism for a ``B0 x s0``
    call, and read the facts (remembered per model, tp, dtype and example length; the
    traces themselves are remembered by shape, so planning at another tp for the same
    ``s0`` is cheap). Raises the planning error."""
    key = (tp, dtype, s0, inputs)
    memo = _FACTS.setdefault(model, {})
    if key in memo:
        return memo[key]
    t0 = time.perf_counter()
    dt = dtype_of(dtype)
    sk = skeleton(model, dt)
    call = _call(model, B0, s0, inputs)
    modes, failed, lone, styles = {}, [], {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for sp in (True, False):
            c = compile_model(model, tp=tp, sequence_parallel=sp, skeleton=sk, input_dtype=dt, **call)
            modes[sp], bad = mode_facts(c, model, s0)
            failed += bad
            lone = lone or lone_layers(c, model)
            styles = styles or flat_styles(c)
    notes = sorted({str(w.message) for w in caught if "tpcompile" in str(w.message)})
    indivisible = any(f"not divisible by tp = {tp}" in n.reason for n in c.plan.notes())
    if failed:
        notes.append(f"no meta kernel for {sorted(set(failed))}: what they keep for backward "
                     "is not counted")
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    memo[key] = ModelFacts(name, tp, s0, dt, modes, buffers, lone, styles, notes,
                           time.perf_counter() - t0, indivisible)
    return memo[key]


def plan_tps(model: nn.Module, name: str, tps: list[int], seq_len: int, dtype: str,
             inputs: Inputs | None = None) -> tuple[dict[int, ModelFacts], dict[int, str]]:
    """Facts for every tp in ``tps``, planning as few times as possible: at the largest
    tp not yet covered, whose divisors are derived from it unless a layer was left
    replicated there for a size that tp does not divide (a smaller tp may divide it). A
    tp the model cannot be planned at (heads it does not divide) gets the planner's
    message instead."""
    facts: dict[int, ModelFacts] = {}
    refused: dict[int, str] = {}
    left = sorted(set(tps), reverse=True)
    s0 = example_length(model, left[0], seq_len)
    while left:
        top = left.pop(0)
        if top == 1 and facts:
            facts[1] = next(iter(facts.values()))
            continue
        try:
            f = facts_for(model, name, top, s0, dtype, inputs)
        except (IndivisibleError, TPCompileError) as e:
            if top == 1:
                raise
            refused[top] = str(e)
            continue
        facts[top] = f
        for t in list(left) if not f.indivisible else []:
            if top % t == 0:
                facts[t] = f
                left.remove(t)
    return facts, refused
