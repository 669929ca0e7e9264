"""What a call may ask of a transformers model that the parallel programs do not serve:
a KV cache, and outputs transformers collects with hooks inside the decoder layers.
Checked on the skeleton before each trace (the first plan and every re-plan)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import UnsupportedError, warn


def _is_cache(x: Any) -> bool:
    """A transformers ``Cache`` (``DynamicCache`` and kin), by its base class's name."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(x).__mro__)


def without_kv_cache(sk: nn.Module, args: tuple, kwargs: dict) -> None:
    """The programs keep no KV cache. A call that asks for one is refused; a model whose
    config turns it on by default (transformers' ``use_cache=True``, as ``from_pretrained``
    loads it) is planned without it (on the skeleton: its outputs' ``past_key_values``
    are None), and says so once."""
    import torch.utils._pytree as pytree
    leaves = pytree.tree_leaves((args, kwargs), is_leaf=_is_cache)
    if kwargs.get("use_cache") is True or kwargs.get("past_key_values") is not None or \
            any(_is_cache(x) for x in leaves):
        raise UnsupportedError(
            f"{type(sk).__name__} was called with a KV cache (use_cache=True or "
            "past_key_values), which tpcompile's programs do not keep yet. Call it with "
            "use_cache=False; to decode, model.generate(..., use_cache=False) or "
            "tpcompile.generate(model, ids, max_new_tokens=...) run without one")
    config = getattr(sk, "config", None)
    if getattr(config, "use_cache", None) is True and kwargs.get("use_cache") is None:
        config.use_cache = False
        warn(f"tpcompile: {type(sk).__name__}'s config has use_cache=True; the parallel "
             "model keeps no KV cache, so it is planned with use_cache=False (past_key_values "
             "in its outputs is None). Set model.config.use_cache = False to say so")


def no_outputs_captured_inside(sk: nn.Module, kwargs: dict) -> None:
    """transformers 5 collects some outputs (attention weights, MoE router logits) with
    forward hooks on layers inside each decoder layer, which a block's program computes
    inline: they would come back missing (or the model's own use of them, the MoE
    load-balancing loss, would fail to trace). A call that asks for them is refused.
    Hidden states are collected at the decoder layers themselves and are served."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # no transformers, or one without hook-captured outputs
        return
    asked: set[str] = set()
    for m in sk.modules():  # each model transformers decorates (a composite has several)
        config = getattr(m, "config", None)
        for k in set(_CAN_RECORD_REGISTRY.get(m)) - {"hidden_states"}:
            # as transformers reads them: output_<key>, cross-attention weights under
            # output_attentions; the call's value where given (None too), else the config's
            f = "output_attentions" if k in ("cross_attentions", "mask_decoder_attentions") \
                else f"output_{k}"
            if kwargs[f] if f in kwargs else getattr(config, f, False):
                asked.add(f)
    if asked:
        flags = sorted(asked)
        said = " and ".join(f"{f}=True" for f in flags)
        raise UnsupportedError(
            f"{type(sk).__name__} was called with {said} (given or in its config). "
            "transformers collects those outputs with hooks on the layers inside each "
            "decoder layer, which tpcompile computes as one program on each rank's shards, "
            "so they are not returned yet. Call it with "
            + " and ".join(f"{f}=False" for f in flags) + " (and set model.config."
            + " = model.config.".join(flags) + " = False)"
            + ("; an MoE's load-balancing loss (aux_loss) reads the router logits, so "
               "train without it" if "output_router_logits" in flags else ""))
