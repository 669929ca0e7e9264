"""The ranked suggestions as a text table (what ``python -m tpcompile suggest`` prints)."""

from __future__ import annotations

from .devices import GiB
from .value import Suggestion


def _ckpt(s: Suggestion) -> str:
    if s.checkpoint_blocks == 0:
        return "none"
    return "block" if s.checkpoint_blocks >= s.blocks else f"{s.checkpoint_blocks}/{s.blocks}"


def _row(i: int, s: Suggestion) -> str:
    m, t = s.memory, s.time
    mem = (f"{m.total / GiB:6.1f} = {m.params / GiB:.1f}+{m.grads / GiB:.1f}+{m.optimizer / GiB:.1f}"
           f"+{m.activations / GiB:.1f}+{m.transient / GiB:.1f}")
    return (f"{i:>3} {s.dp:>5} x {s.tp:<3} {'on' if s.sequence_parallel else 'off':<4}"
            f"{_ckpt(s):<7} {s.micro_batch:>3} x {s.grad_accumulation:<4} {s.step_time_s:>8.3f} "
            f"{s.tokens_per_s_per_device:>9,.0f}  {t.compute + t.recompute:>7.3f} {t.tp_comm:>7.3f} "
            f"{t.fsdp_comm_exposed:>7.3f}  {mem}")


def table(suggestions: list[Suggestion], *, title: str = "", top: int = 10,
          infeasible: int = 3) -> str:
    head = (f"{'#':>3} {'dp':>5} x {'tp':<3} {'SP':<4}{'ckpt':<7} {'mb':>3} x {'acc':<4} "
            f"{'step s':>8} {'tok/s/dev':>9}  {'compute':>7} {'tp comm':>7} {'fsdp':>7}  "
            "memory GiB = params+grads+optim+activations+transient")
    lines = [title] if title else []
    ok = [s for s in suggestions if s.feasible]
    bad = [s for s in suggestions if not s.feasible]
    if ok:
        lines += [head] + [_row(i + 1, s) for i, s in enumerate(ok[:top])]
        if len(ok) > top:
            lines.append(f"    ... {len(ok) - top} more feasible")
        best = ok[0]
        if best.replicate:
            lines.append(f"  keep replicated (cheaper than sharding): {', '.join(best.replicate)}")
        if best.checkpoint_blocks:
            lines.append(f"  checkpoint the first {best.checkpoint_blocks} of {best.blocks} blocks "
                         "(torch.utils.checkpoint around each block's forward)")
    else:
        lines.append("nothing fits:")
    for s in bad[:infeasible]:
        lines.append(f"  infeasible: dp {s.dp} x tp {s.tp}" +
                     (f", SP {'on' if s.sequence_parallel else 'off'}, checkpointing {_ckpt(s)}, "
                      f"micro-batch {s.micro_batch}" if s.micro_batch else "") + f": {s.reason}")
    if len(bad) > infeasible:
        lines.append(f"  ... {len(bad) - infeasible} more infeasible")
    return "\n".join(lines) + "\n"


def g(b: float) -> str:
    """Bytes in the unit that reads best."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{int(b)} B"


def predicted(s: Suggestion | None) -> str:
    """``explain``'s closing section: the cost model's memory and step time for the mesh."""
    if s is None:
        return ""
    m, t = s.memory, s.time
    fits = "fits" if s.feasible else "does not fit"
    ckpt = "no checkpointing" if not s.checkpoint_blocks else (
        "every block checkpointed" if s.checkpoint_blocks >= s.blocks else
        f"{s.checkpoint_blocks} of {s.blocks} blocks checkpointed")
    recompute = f" + recompute {t.recompute:.4g} s" if t.recompute else ""
    return "\n".join([
        "", f"Predicted on {s.device} (tpcompile.suggest's cost model; AdamW, fp32 master "
        f"weights, {ckpt}, {s.micro_batch} sequence(s) per dp rank)",
        f"  memory per device {g(m.total)} of {g(m.available)} ({fits}): parameters "
        f"{g(m.params)}, gradients {g(m.grads)}, optimizer {g(m.optimizer)}, activations "
        f"{g(m.activations)}, transient {g(m.transient)}",
        f"  step time {s.step_time_s:.4g} s: compute {t.compute:.4g} s{recompute}, tensor-parallel "
        f"communication {t.tp_comm:.4g} s, FSDP communication {t.fsdp_comm:.4g} s "
        f"({t.fsdp_comm_hidden:.4g} s hidden under compute, {t.fsdp_comm_exposed:.4g} s exposed); "
        f"{s.tokens_per_s_per_device:,.0f} tokens/s per device", ""])
