"""Collectives per training step, by kind, count and bytes: tpcompile vs the hand plan,
per transformer block, against the Megatron minimum.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/collectives.py [--json]

Every collective (tpcompile's and DTensor's) is a c10d functional op, so
``tpcompile.counting.CollectiveCounter`` (a TorchDispatchMode) sees it, in forward and
backward. Per block = counts at depth L+1 minus counts at depth L; the rest of the
model (embedding, final norm, head) is the depth-L count minus L blocks. Bytes are each
collective's input on one rank.

Megatron minimum per block (b x s tokens, dim d, fp32):
  no SP: forward 2 all-reduce of b*s*d; backward 2 all-reduce of b*s*d
  SP:    forward 2 all-gather (in: b*s/tp*d) + 2 reduce-scatter (in: b*s*d);
         backward the mirror, 2 reduce-scatter + 2 all-gather.
  (Under SP the norm weights' gradients are partial per rank and must be summed too:
  2*d floats per block, which Megatron does once for the whole model.)
"""

from __future__ import annotations

import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from bench import common as C  # noqa: E402

from tpcompile.counting import CollectiveCounter  # noqa: E402

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send")
PHASES = ("fwd", "bwd", "opt")


def count_step(p: C.Program, tokens, targets) -> dict[str, tuple[Counter, Counter]]:
    """{phase: (counts by kind, bytes by kind)} for one training step."""
    out = {}
    p.opt.zero_grad(set_to_none=True)
    with CollectiveCounter() as c:
        logits = p.model(tokens)
    out["fwd"] = (Counter(c.counts), Counter(c.bytes))
    with C.loss_context():  # under loss_parallel the loss's own collectives count as bwd
        with CollectiveCounter() as c:
            C.loss_of(logits, targets).backward()
    out["bwd"] = (Counter(c.counts), Counter(c.bytes))
    with CollectiveCounter() as c:
        p.opt.step()
    out["opt"] = (Counter(c.counts), Counter(c.bytes))
    return out


def counts_at(depth: int, mesh, device, args, sp: bool, batch: int, seq: int) -> dict:
    ref = C.build_model(depth, args.vocab, device, args.seed)
    tokens, targets = C.make_batch(batch, seq, args.vocab, device)
    res = {}
    for p in C.programs(ref, mesh, sp):
        C.require_close(p.name, C.check_numerics(ref, p.model, tokens, targets))
        count_step(p, tokens, targets)  # warm-up: lazy state (optimizer, caches)
        res[p.name] = count_step(p, tokens, targets)
    return res


def _fmt(counts: Counter, nbytes: Counter) -> str:
    parts = [f"{counts[k]} {k.replace('_', '-')} ({nbytes[k] / 1024:.0f} KiB)"
             for k in KINDS if counts[k]]
    return ", ".join(parts) or "none"


def minimum(sp: bool, batch: int, seq: int, tp: int) -> dict[str, tuple[Counter, Counter]]:
    full = batch * seq * 256 * 4
    if not sp:
        one = (Counter(all_reduce=2), Counter(all_reduce=2 * full))
        return {"fwd": one, "bwd": one, "opt": (Counter(), Counter())}
    both = (Counter(all_gather=2, reduce_scatter=2),
            Counter(all_gather=2 * full // tp, reduce_scatter=2 * full))
    return {"fwd": both, "bwd": both, "opt": (Counter(), Counter())}


def rows_for(mesh, device, args, sp: bool, batch: int, seq: int) -> list[dict]:
    lo = counts_at(args.layers, mesh, device, args, sp, batch, seq)
    hi = counts_at(args.layers + 1, mesh, device, args, sp, batch, seq)
    mins = minimum(sp, batch, seq, mesh.size())
    rows = []
    for phase in PHASES:
        row = {"sp": "on" if sp else "off", "batch": batch, "seq": seq, "phase": phase,
               "megatron_block": _fmt(*mins[phase])}
        for name in C.PROGRAMS:
            (c_lo, b_lo), (c_hi, b_hi) = lo[name][phase], hi[name][phase]
            c_blk, b_blk = c_hi - c_lo, b_hi - b_lo
            c_rest = Counter({k: c_lo[k] - args.layers * c_blk[k] for k in KINDS})
            b_rest = Counter({k: b_lo[k] - args.layers * b_blk[k] for k in KINDS})
            row[f"{name}_block"] = _fmt(c_blk, b_blk)
            row[f"{name}_rest"] = _fmt(+c_rest, +b_rest)
            row[f"{name}_counts"] = {k: c_blk[k] for k in KINDS if c_blk[k]}
            row[f"{name}_bytes"] = {k: b_blk[k] for k in KINDS if b_blk[k]}
            row[f"{name}_rest_counts"] = {k: c_rest[k] for k in KINDS if c_rest[k]}
        row["tpcompile_is_min"] = row["tpcompile_counts"] == dict(+mins[phase][0])
        rows.append(row)
    return rows


COLUMNS = [("sp", "SP", ""), ("batch", "batch", ""), ("seq", "seq", ""), ("phase", "phase", ""),
           ("tpcompile_block", "tpcompile / block", ""), ("hand_block", "hand / block", ""),
           ("megatron_block", "Megatron min / block", ""),
           ("tpcompile_rest", "tpcompile rest of model", ""), ("hand_rest", "hand rest of model", "")]


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.set_defaults(sizes="2x64")
    args = p.parse_args()
    mesh, device = C.init(args.dp, args.loss_parallel)
    rows = [r for sp in C.sp_modes(args.sp) for b, s in C.sizes(args.sizes)
            for r in rows_for(mesh, device, args, sp, b, s)]
    meta = {"what": "collectives", "layers": args.layers, "vocab": args.vocab,
            "device": device.type, **C.machine()}
    C.emit(meta, rows, COLUMNS, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
