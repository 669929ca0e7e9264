"""A timeline of one backward: what computes while each gradient reduction is on the wire.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/overlap_trace.py [--batch 8 --seq 256]

Runs the tutorial Llama (tp 2, sequence parallelism off unless --sp) with tpcompile's
program and with the same program built without the overlap, records every op of one
backward on rank 0 with its start and end (tpcompile.counting.OpTimeline), and prints,
for each input-gradient reduction of a block: when it was launched, the weight-gradient
matmuls that ran before its wait, and how long the wait then blocked, beside the same
reduction waited on at once in the serial program.

With ``--profiler`` it records one whole training step (forward and backward) with
torch.profiler instead, and prints what the process group's own thread ran (gloo's
``gloo:all_reduce``, ``gloo:all_gather``, ``gloo:reduce_scatter`` with their start and
end) beside the matmuls the main thread ran meanwhile: a collective on the wire while a
later matmul computes, from the profiler's own clock (``--chrome`` also writes the
trace for chrome://tracing or Perfetto).
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


def profiled_step(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
                  chrome: str | None) -> list[dict]:
    """One forward + backward under torch.profiler on this rank: for each collective the
    process group's thread ran, its interval and the main thread's matmuls inside it."""
    from torch.profiler import ProfilerActivity, profile
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        C.loss_of(model(tokens), targets).backward()
    if chrome:
        prof.export_chrome_trace(chrome)
    ev = [e for e in prof.events() if e.time_range.end > e.time_range.start]
    t0 = min(e.time_range.start for e in ev)
    main = next(e.thread for e in ev if e.name == "aten::mm")
    mms = [e for e in ev if e.name == "aten::mm" and e.thread == main]
    waits = sorted((e for e in ev if e.name == "_c10d_functional::wait_tensor"),
                   key=lambda e: e.time_range.start)
    out = []
    gloo = sorted((e for e in ev if e.name.startswith("gloo:")), key=lambda e: e.time_range.start)
    for g in gloo:
        a, b = g.time_range.start, g.time_range.end
        inside = [(max(a, m.time_range.start), min(b, m.time_range.end)) for m in mms
                  if m.time_range.start < b and m.time_range.end > a]
        wait = next((w for w in waits if w.time_range.end >= b), None)
        out.append({"kind": g.name, "start": (a - t0) / 1e3, "end": (b - t0) / 1e3,
                    "mm": len(inside), "mm_ms": sum(y - x for x, y in inside) / 1e3,
                    "wait_from": None if wait is None else (wait.time_range.start - t0) / 1e3,
                    "wait_ms": None if wait is None else wait.cpu_time_total / 1e3})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="backwards recorded; the last is shown")
    p.add_argument("--profiler", action="store_true",
                   help="torch.profiler on one whole step: the process group thread's "
                        "collectives beside the main thread's matmuls (tpcompile only)")
    p.add_argument("--chrome", metavar="JSON", help="with --profiler: also write rank 0's trace")
    args = p.parse_args()
    mesh, device = C.init()
    ref = C.build_model(2, 32000, device)
    tokens, targets = C.make_batch(args.batch, args.seq, 32000, device)
    if args.profiler:
        model = C.PARALLELIZE["tpcompile"](copy.deepcopy(ref), mesh, args.sp)
        for _ in range(args.repeats):
            rows = profiled_step(model, tokens, targets, args.chrome if C.rank0() else None)
        if C.rank0():
            print(f"tp 2, batch {args.batch} x seq {args.seq}, sp={'on' if args.sp else 'off'}; "
                  "one forward + backward on rank 0, ms from its start (torch.profiler)")
            print("| collective (gloo thread) | on the wire | main-thread matmuls meanwhile "
                  "| its wait_tensor: starts, blocks |\n|---|---|---|---|")
            for r in rows:
                w = "-" if r["wait_from"] is None else \
                    f"{r['wait_from']:.2f}, {r['wait_ms']:.2f} ms"
                print(f"| {r['kind']} | {r['start']:.2f} - {r['end']:.2f} | {r['mm']} "
                      f"({r['mm_ms']:.2f} ms) | {w} |")
        dist.destroy_process_group()
        return
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
