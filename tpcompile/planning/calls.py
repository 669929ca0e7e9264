"""What a call may ask of a transformers model that the parallel programs do not serve:
a KV cache. Checked on the skeleton before each trace (the first plan and every
re-plan). (Outputs transformers collects with hooks inside the decoder layers, attention
weights and MoE router logits, are served: those layers are traced inline,
``frontend.blocks.captured_inside``.)"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import UnsupportedError, warn


def is_transformers(x: Any, base: str) -> bool:
    """Whether ``x`` is an instance of transformers' class named ``base`` (a ``Cache``, a
    ``PreTrainedModel``), by name: transformers is never imported for it."""
    return any(c.__name__ == base and c.__module__.startswith("transformers")
               for c in type(x).__mro__)


def _is_cache(x: Any) -> bool:
    """A transformers ``Cache`` (``DynamicCache`` and kin)."""
    return is_transformers(x, "Cache")


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

