"""A timeline of one backward: what computes while each gradient reduction is on the wire.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/overlap_trace.py [--batch 8 --seq 256]

Runs the tutorial Llama (tp 2, sequence parallelism off unless --sp) with tpcompile's
program and with the same program built without the overlap, records every op of one
backward on rank 0 with its start and end (tpcompile.counting.OpTimeline), and prints,
for each input-gradient reduction of a block: when it was launched, the weight-gradient
matmuls that ran before its wait, and how long the wait then blocked, beside the same
reduction waited on at once in the serial program.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench import common as C  # noqa: E402
from tpcompile.counting import OpTimeline  # noqa: E402

LAUNCH = ("_c10d_functional.all_reduce", "_c10d_functional.reduce_scatter_tensor")


def reductions(events: list[tuple[str, float, float]]) -> list[dict]:
    """Each reduction of ``events``: its launch time, the ops until its wait, the wait."""
    out = []
    for i, (name, t0, _) in enumerate(events):
        if name not in LAUNCH:
            continue
        j = next(k for k in range(i + 1, len(events))
                 if events[k][0] == "_c10d_functional.wait_tensor")
        between = events[i + 1:j]
        mm = [e for e in between if e[0] == "aten.mm"]
        out.append({"kind": name.split(".")[1], "launch": t0,
                    "mm": [(a - t0, b - t0) for _, a, b in mm],
                    "wait": events[j][2] - events[j][1], "done": events[j][2] - t0})
    return out


def one_backward(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> list:
    loss = C.loss_of(model(tokens), targets)
    dist.barrier()
    with OpTimeline() as t:
        loss.backward()
    return t.events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="backwards recorded; the last is shown")
    args = p.parse_args()
    mesh, device = C.init()
    ref = C.build_model(2, 32000, device)
    tokens, targets = C.make_batch(args.batch, args.seq, 32000, device)
    shown = {}
    for name in ("tpcompile", "tpcompile-serial"):
        model = C.PARALLELIZE[name](copy.deepcopy(ref), mesh, args.sp)
        for _ in range(args.repeats):
            events = one_backward(model, tokens, targets)
        shown[name] = reductions(events)
    if C.rank0():
        print(f"tp 2, batch {args.batch} x seq {args.seq}, sp={'on' if args.sp else 'off'}; "
              "times in ms from each reduction's launch (rank 0)")
        for a, b in zip(shown["tpcompile"], shown["tpcompile-serial"]):
            if not a["mm"]:
                continue  # reductions with nothing to overlap (norm-weight sums, the head)
            mms = ", ".join(f"mm {1e3 * s:.2f}-{1e3 * e:.2f}" for s, e in a["mm"])
            print(f"{a['kind']:22s} overlapped: launched 0.00, {mms}, wait blocked "
                  f"{1e3 * a['wait']:.2f}, done {1e3 * a['done']:.2f} | serial: wait blocked "
                  f"{1e3 * b['wait']:.2f} before any matmul")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
