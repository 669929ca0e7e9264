"""``Suggestion``: one way to lay a model over the GPUs, priced; a pydantic value."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import TPCompileError


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemoryBreakdown(_M):
    """Bytes on one device at the peak (the start of backward)."""

    params: int
    grads: int
    optimizer: int
    activations: int  # kept for backward, logits and the loss's fp32 buffers included
    transient: int  # FSDP-gathered parameters and gradient buffers, recompute, buffers
    total: int
    available: int


class TimeBreakdown(_M):
    """Seconds per optimizer step on one device."""

    compute: float  # forward and backward, loss, optimizer step
    recompute: float  # activation checkpointing's second forward
    tp_comm: float  # tensor-parallel collectives, all on the critical path
    fsdp_comm: float  # all-gathers and reduce-scatters over dp
    fsdp_comm_hidden: float
    fsdp_comm_exposed: float
    step: float


class Suggestion(_M):
    """A mesh, sequence parallelism, checkpointing and micro-batch for one model, priced.

    >>> s = tpcompile.suggest(model, 256, global_batch=256, seq_len=8192)[0]
    >>> model = tpcompile.auto_parallelize(model, s.device_mesh(), **s.kwargs())
    """

    mesh_shape: tuple[int, int]
    mesh_dim_names: tuple[str, str] = ("dp", "tp")
    sequence_parallel: bool
    activation_checkpointing: Literal["none", "block"]
    checkpoint_blocks: int  # how many blocks are checkpointed ("block": all, unless memory needs fewer)
    blocks: int
    micro_batch: int  # sequences per dp rank per forward
    grad_accumulation: int
    global_batch: int
    seq_len: int
    dtype: str
    device: str
    feasible: bool
    reason: str
    step_time_s: float
    tokens_per_s_per_device: float
    memory: MemoryBreakdown
    time: TimeBreakdown
    replicate: list[str] = []  # sharded by the detected plan, but cheaper replicated
    plan: dict[str, str] | None = None  # flat plan to apply (set when ``replicate`` is)

    @property
    def dp(self) -> int:
        return self.mesh_shape[0]

    @property
    def tp(self) -> int:
        return self.mesh_shape[1]

    def device_mesh(self, device_type: str | None = None) -> Any:
        """The ``("dp", "tp")`` mesh, under torchrun (the process group is made if needed)."""
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        world = dist.get_world_size() if dist.is_initialized() else None
        if world is not None and world != self.dp * self.tp:
            raise TPCompileError(
                f"this suggestion is for {self.dp * self.tp} ranks (dp {self.dp} x tp "
                f"{self.tp}), but the process group has {world}: ask suggest() for "
                f"world_size={world}")
        return init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.mesh_dim_names)

    def kwargs(self) -> dict[str, Any]:
        """``auto_parallelize`` arguments: sequence parallelism, activation checkpointing
        of the first ``checkpoint_blocks`` blocks (``"block"``: every one), bf16 compute
        on fp32 master weights (FSDP2's mixed precision) and, when the cost model keeps a
        layer replicated, the plan saying so."""
        import torch
        out: dict[str, Any] = {"sequence_parallel": self.sequence_parallel}
        if self.checkpoint_blocks:
            out["activation_checkpointing"] = "block" if self.checkpoint_blocks >= self.blocks \
                else self.checkpoint_blocks
        if self.dtype in ("bf16", "fp16"):
            from torch.distributed.fsdp import MixedPrecisionPolicy
            param = torch.bfloat16 if self.dtype == "bf16" else torch.float16
            out["mp_policy"] = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=torch.float32)
        if self.plan is not None:
            from ..planning.files import flat_plan
            out["plan"] = flat_plan(dict(self.plan), "suggestion")
        return out

    def label(self) -> str:
        ckpt = "none" if self.checkpoint_blocks == 0 else (
            "block" if self.checkpoint_blocks >= self.blocks else f"block {self.checkpoint_blocks}/{self.blocks}")
        return (f"dp {self.dp} x tp {self.tp}, SP {'on' if self.sequence_parallel else 'off'}, "
                f"checkpointing {ckpt}, micro-batch {self.micro_batch} x {self.grad_accumulation}")
