"""``suggest``: every way to split a model over N GPUs, priced and ranked.

Planning happens once per model (at the largest tensor-parallel degree the search may
use, with and without sequence parallelism; remembered); the enumeration over
``(dp, tp)``, sequence parallelism, activation checkpointing and the micro-batch is
closed-form arithmetic on those facts (:mod:`cost`), so a search over 1024 GPUs
answers in well under a second once the model is planned.
"""

from __future__ import annotations

from typing import Any, Literal

from ..errors import TPCompileError
from .cost import OPTIMIZER_STATES, Candidate, Setup, checkpoint_needed, price
from .devices import GiB, DevicePreset, load_device
from .facts import ModelFacts
from .source import Inputs, as_module, dtype_of, plan_tps
from .value import MemoryBreakdown, Suggestion, TimeBreakdown

Checkpointing = Literal["auto", "none", "block"]


class SuggestError(TPCompileError):
    """Arguments ``suggest`` cannot search with."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive(**values: Any) -> None:
    for what, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SuggestError(f"{what} must be a positive integer, got {v!r}")


def suggest(model: Any, world_size: int, *, gpus_per_node: int = 8,
            device: str | DevicePreset = "h100-80gb", global_batch: int, seq_len: int,
            dtype: str = "bf16", optimizer: str = "adamw",
            activation_checkpointing: Checkpointing = "auto",
            example_inputs: Inputs | None = None) -> list[Suggestion]:
    """How to split ``model`` over ``world_size`` GPUs: every candidate, fastest first.

    Args:
        model: an ``nn.Module`` (built on the meta device is fine), a Hugging Face
            ``PretrainedConfig``, a config dict, or a ``config.json`` path.
        world_size: GPUs in the job; ``gpus_per_node`` of them per host. Tensor
            parallelism stays inside a node (tp divides ``gpus_per_node``).
        device: a preset name (``h100-80gb``, ``a100-80gb``, ``a100-40gb``, ``b200``,
            ``cpu-gloo``), a preset file (``tpcompile.calibrate()`` writes one) or a
            ``DevicePreset``.
        global_batch: sequences per optimizer step, over all dp ranks; ``seq_len`` tokens each.
        dtype: compute dtype (``bf16``/``fp16``: fp32 master weights, FSDP2 mixed
            precision; ``fp32``).
        optimizer: ``adamw`` / ``adam`` (2 fp32 states), ``sgd_momentum``, ``sgd``.
        activation_checkpointing: ``"none"``, ``"block"`` (every block), or ``"auto"``
            (none, every block, and the fewest blocks that make it fit).
        example_inputs: ``(batch, seq) -> args or kwargs`` when the model's input cannot
            be guessed (token ids for a model starting with an Embedding).

    Returns every candidate as a :class:`Suggestion`, feasible ones by predicted step
    time, then the infeasible ones with the reason. The first one applies in two lines::

        s = tpcompile.suggest(cfg, 256, global_batch=256, seq_len=8192)[0]
        model = tpcompile.auto_parallelize(model, s.device_mesh(), **s.kwargs())
    """
    _positive(world_size=world_size, gpus_per_node=gpus_per_node, global_batch=global_batch,
              seq_len=seq_len)
    if optimizer not in OPTIMIZER_STATES:
        raise SuggestError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZER_STATES)}")
    if activation_checkpointing not in ("auto", "none", "block"):
        raise SuggestError(f"activation_checkpointing must be 'auto', 'none' or 'block', got "
                           f"{activation_checkpointing!r}")
    dtype_of(dtype)
    dev = load_device(device)
    module, name = as_module(model)
    setup = Setup(world_size, gpus_per_node, global_batch, seq_len, dtype,
                  OPTIMIZER_STATES[optimizer], dev)
    out = _search(module, name, setup, activation_checkpointing, example_inputs)
    if out and not any(s.feasible for s in out):
        hint = _state(module, setup) + _least_world(module, name, setup,
                                                    activation_checkpointing, example_inputs)
        for s in out:
            s.reason += hint
    return out


def _state(module: Any, s: Setup) -> str:
    """'; model state ... needs X, N x Y = Z available' when the whole job cannot hold it."""
    need = sum(p.numel() for p in module.parameters()) * 4.0 * (2 + s.states)
    have = s.world * s.device.usable_bytes
    if need <= have:
        return ""
    return (f"; the model state alone (fp32 parameters, gradients, optimizer) needs "
            f"{need / GiB:,.0f} GiB, {s.world} x {s.device.usable_bytes / GiB:.1f} = "
            f"{have / GiB:,.0f} GiB available")


def _tps(s: Setup) -> list[int]:
    return [t for t in divisors(s.gpus_per_node) if s.world % t == 0]


def _search(module: Any, name: str, s: Setup, ckpt: str, inputs: Inputs | None,
            only_feasibility: bool = False) -> list[Suggestion]:
    facts, refused = plan_tps(module, name, _tps(s), s.seq_len, s.dtype, inputs)
    out: list[Suggestion] = []
    for tp in _tps(s):
        dp = s.world // tp
        if tp in refused:
            out.append(_refused(s, dp, tp, f"tp {tp} cannot be planned: {refused[tp]}"))
            continue
        if s.global_batch % dp:
            out.append(_refused(s, dp, tp, f"global_batch {s.global_batch} does not split over "
                                f"dp {dp}: use a multiple of {dp} sequences, or a larger tp"))
            continue
        f = facts[tp]
        for sp in ([False, True] if tp > 1 and s.seq_len % tp == 0 else [False]):
            for mb in reversed(divisors(s.global_batch // dp)):
                for k in _checkpoints(f, Candidate(dp, tp, sp, 0, mb), s, ckpt):
                    sug = _best_replication(f, Candidate(dp, tp, sp, k, mb), s)
                    out.append(sug)
                    if only_feasibility and sug.feasible:
                        return out
    feasible = sorted((x for x in out if x.feasible),
                      key=lambda x: (x.step_time_s, x.memory.total))
    rest = sorted((x for x in out if not x.feasible), key=lambda x: x.memory.total)
    return feasible + rest


def _checkpoints(f: ModelFacts, c: Candidate, s: Setup, mode: str) -> list[int]:
    if f.blocks == 0 or mode == "none":
        return [0]
    if mode == "block":
        return [f.blocks]
    need = checkpoint_needed(f, c, s)
    return sorted({0, f.blocks} | ({need} if need else set()))


def _best_replication(f: ModelFacts, c: Candidate, s: Setup) -> Suggestion:
    """Keep a lone sharded layer (a position embedding, a small head) replicated when
    that is faster: its collectives cost more than sharding saves."""
    best = price(f, c, s)
    if c.tp == 1:
        return best
    for layer in f.lone_layers:
        trial_c = Candidate(c.dp, c.tp, c.sp, c.ckpt, c.mb, c.replicate | {layer})
        trial = price(f, trial_c, s)
        if trial.feasible >= best.feasible and trial.step_time_s < best.step_time_s:
            best, c = trial, trial_c
    if best.replicate:
        best.plan = {k: v for k, v in f.styles.items() if k not in best.replicate}
    return best


def _refused(s: Setup, dp: int, tp: int, reason: str) -> Suggestion:
    zero = MemoryBreakdown(params=0, grads=0, optimizer=0, activations=0, transient=0, total=0,
                           available=s.device.usable_bytes)
    return Suggestion(mesh_shape=(dp, tp), sequence_parallel=False, activation_checkpointing="none",
                      checkpoint_blocks=0, blocks=0, micro_batch=0, grad_accumulation=0,
                      global_batch=s.global_batch, seq_len=s.seq_len, dtype=s.dtype,
                      device=s.device.name, feasible=False, reason=reason, step_time_s=float("inf"),
                      tokens_per_s_per_device=0.0, memory=zero,
                      time=TimeBreakdown(compute=0, recompute=0, tp_comm=0, fsdp_comm=0,
                                         fsdp_comm_hidden=0, fsdp_comm_exposed=0, step=0))


def _least_world(module: Any, name: str, s: Setup, ckpt: str, inputs: Inputs | None) -> str:
    """'': use >= N GPUs', the least world size (multiples of a node; powers of two below
    one) at which some candidate fits, with this global batch if it splits, else the
    batch rounded up to the world's dp."""
    sizes = sorted({2**i for i in range(1, 20) if 2**i < s.gpus_per_node} |
                   {s.gpus_per_node * k for k in range(1, 4097)})
    for w in (x for x in sizes if x > s.world):
        batch = s.global_batch if s.global_batch % (w // min(w, s.gpus_per_node)) == 0 else \
            max(s.global_batch, w)
        trial = Setup(w, s.gpus_per_node, batch, s.seq_len, s.dtype, s.states, s.device)
        if any(x.feasible for x in _search(module, name, trial, ckpt, inputs, True)):
            more = "" if ckpt != "none" or not _fits_with_checkpointing(module, name, s, inputs) \
                else " or activation checkpointing"
            return f": use >= {w} GPUs{more}"
    return f": no world size up to {sizes[-1]} fits"


def _fits_with_checkpointing(module: Any, name: str, s: Setup, inputs: Inputs | None) -> bool:
    return any(x.feasible for x in _search(module, name, s, "block", inputs, True))


def price_mesh(model: Any, *, dp: int, tp: int, batch: int, seq_len: int,
               sequence_parallel: bool, dtype: str = "bf16", device: str | DevicePreset = "h100-80gb",
               optimizer: str = "adamw", checkpoint_blocks: int | str = 0) -> Suggestion | None:
    """The price of one given mesh (``batch`` sequences per dp rank, one micro-batch):
    what ``explain`` prints (``checkpoint_blocks``: a number, ``"block"`` for every block,
    as ``auto_parallelize(activation_checkpointing=...)`` takes it). None when the model
    cannot be planned for it."""
    dev = load_device(device)
    module, name = as_module(model)
    setup = Setup(dp * tp, max(dev.gpus_per_node or tp, tp), batch * dp, seq_len, dtype,
                  OPTIMIZER_STATES[optimizer], dev)
    try:
        facts, _ = plan_tps(module, name, [tp], seq_len, dtype)
    except TPCompileError:
        return None
    if tp not in facts:
        return None
    from ..runtime.checkpointing import checkpoint_count
    ckpt = checkpoint_count(checkpoint_blocks, facts[tp].blocks, name)
    return price(facts[tp], Candidate(dp, tp, sequence_parallel and tp > 1, ckpt, batch), setup)


__all__ = ["SuggestError", "price_mesh", "suggest"]
