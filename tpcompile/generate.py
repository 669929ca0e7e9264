"""Greedy generation on a parallel module (or any causal LM): ``tpcompile.generate``.

There is no KV cache yet: each step runs the whole sequence so far, so a step costs a
full forward (tokens/s falls with length). The parallel module picks its program per
call: lengths that divide by tp run sequence parallel, the others (a prompt of odd
length, every other step) run the same weights without it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn


def _logits(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
             eos_token_id: int | None = None, **kwargs: Any) -> torch.Tensor:
    """``input_ids`` ``[batch, prompt]`` followed by up to ``max_new_tokens`` greedy tokens
    (argmax of the last position's logits). A Hugging Face model is called with
    ``input_ids=`` (and ``use_cache=False``), any other with the ids positionally;
    ``kwargs`` go to every call. Stops early once every row has produced ``eos_token_id``.
    Every rank must call it with the same ids (the parallel module checks)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    params = inspect.signature(type(model).forward).parameters
    by_name = "input_ids" in params
    if by_name and "use_cache" in params:
        kwargs.setdefault("use_cache", False)
    ids, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool,
                                       device=input_ids.device)
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, **kwargs) if by_name else model(ids, **kwargs)
        step = _logits(out)[:, -1, :].argmax(dim=-1)
        if eos_token_id is not None:
            step = step.masked_fill(done, eos_token_id)
            done |= step == eos_token_id
        ids = torch.cat([ids, step[:, None].to(ids.dtype)], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids
