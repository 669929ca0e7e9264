"""Count the collectives a program runs, by kind, with their bytes.

Every collective tpcompile inserts (and every one DTensor issues) is a c10d functional
op, so a ``TorchDispatchMode`` sees each of them, in forward and in backward alike.

    with CollectiveCounter() as c:
        loss = model(x).sum()
    c.counts   # {"all_reduce": 2}
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# c10d functional op name -> kind; the in-place c10d ops DTensor/FSDP may use are counted too
_KINDS = {
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all", "broadcast": "broadcast",
    "allreduce_": "all_reduce", "_allgather_base_": "all_gather", "allgather_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "broadcast_": "broadcast",
    # a large head's gather on gloo goes as a send to every other rank (and as many
    # receives, not counted: the bytes are the sends'); see rewrite.head
    "send": "send",
}


@dataclass
class CollectiveCounter(TorchDispatchMode):
    """Counts collectives by kind; ``bytes`` sums the size of each one's input."""

    counts: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    log: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # A DTensor op is declined, so DTensor's own dispatch runs it with this mode still
        # active and the collectives it issues inside (a Partial gradient reduced in an
        # optimizer step, a redistribute) are counted too.
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        ns = func.namespace
        if ns in ("_c10d_functional", "c10d_functional", "c10d"):
            kind = _KINDS.get(func._opname)
            if kind is not None:
                t = next((x for x in tree_leaves(args) if isinstance(x, torch.Tensor)), None)
                self.counts[kind] += 1
                if t is not None:
                    self.bytes[kind] += t.numel() * t.element_size()
                    self.log.append((kind, tuple(t.shape)))
        return func(*args, **(kwargs or {}))

    def reset(self) -> None:
        self.counts.clear()
        self.bytes.clear()
        self.log.clear()


@dataclass
class OpTimeline(TorchDispatchMode):
    """Every ATen and c10d op this thread runs, with its start and end (``time.perf_counter``
    seconds), in order: where a collective is launched, what computes while it is in
    flight, and how long its ``wait_tensor`` then blocks.

        with OpTimeline() as t:
            loss.backward()
        t.events   # [("_c10d_functional.all_reduce", t0, t1), ("aten.mm", ...), ...]
    """

    events: list[tuple[str, float, float]] = field(default_factory=list)
    # per event: the address of the tensor a collective is waited on by (its output, or
    # the in-place all-gather's input, which the head registers its work under) or that a
    # wait_tensor waits on
    buffers: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.events.append((f"{func.namespace}.{func._opname}", t0, time.perf_counter()))
        key, t = None, None
        if func.namespace == "_c10d_functional":
            t = args[0] if func._opname == "wait_tensor" else out
        elif func.namespace == "c10d" and func._opname in ("allgather_", "send"):
            # the gathered input (the tensor sent): a wait_tensor on it waits for it
            # (rewrite.head._gather_columns)
            t = args[1][0] if func._opname == "allgather_" else args[0][0]
        if isinstance(t, torch.Tensor):
            key = t.data_ptr()
        self.buffers.append(key)
        return out

    def in_flight(self, kinds: tuple[str, ...] = ("all_reduce", "reduce_scatter_tensor")
                  ) -> list[list[str]]:
        """For each collective launched (of ``kinds``, op names), the ops run between its
        launch and its own ``wait_tensor`` (the first wait on the same tensor): what
        computed while it was on the wire. An in-place c10d collective nobody waits on
        with ``wait_tensor`` (``dist.all_gather`` outside the head) runs to the end."""
        out: list[list[str]] = []
        names = [e[0] for e in self.events]
        for i, name in enumerate(names):
            ns, op = name.split(".", 1)
            if ns in ("_c10d_functional", "c10d") and op in kinds:
                j = next((k for k in range(i + 1, len(names))
                          if names[k] == "_c10d_functional.wait_tensor"
                          and self.buffers[k] == self.buffers[i]), len(names))
                out.append(names[i + 1:j])
        return out
