"""Peak memory per rank of one training step: tpcompile vs the hand-written plan.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/memory.py [--json]

peak = static + transient, per rank, where
  static     the bytes of this rank's parameter shards and AdamW state (resident between
             steps; gradients are freed before each step);
  transient  the highest point, above the start of the step, of the bytes the tensor
             allocator holds during forward + backward + optimizer step (activations,
             gradients, collective buffers, temporaries).
CPU: the allocator's own events, recorded by torch.profiler(profile_memory=True) and
summed in time order. CUDA: torch.cuda.max_memory_allocated() minus the allocation at
the start of the step. Both programs are measured in the same run, after warm-up steps,
alternating, ``--rounds`` times each. The transient peak is not the same every step: the
buffer of a finished collective is freed by the process group when its work object goes,
which on gloo may be after the next allocations. So "peak" is the median over rounds and
"peak max" the largest; both are of the largest rank.
"""

from __future__ import annotations

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench import common as C  # noqa: E402

MiB = 1024 * 1024


def static_bytes(p: C.Program) -> int:
    seen: dict[int, int] = {}
    tensors = list(p.model.parameters())
    for state in p.opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def transient_cpu(p: C.Program, tokens, targets) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = C.loss_backward(p.model(tokens), targets)
        p.opt.step()
        del loss
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def transient_cuda(p: C.Program, tokens, targets, device) -> int:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = C.loss_backward(p.model(tokens), targets)
    p.opt.step()
    del loss
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def measure(p: C.Program, tokens, targets, device) -> tuple[int, int]:
    p.opt.zero_grad(set_to_none=True)
    gc.collect()
    static = static_bytes(p)
    dist.barrier()
    if device.type == "cuda":
        return static, transient_cuda(p, tokens, targets, device)
    return static, transient_cpu(p, tokens, targets)


def run_case(mesh, device, args, sp: bool, batch: int, seq: int) -> dict:
    ref = C.build_model(args.layers, args.vocab, device, args.seed)
    progs = C.programs(ref, mesh, sp)
    tokens, targets = C.make_batch(batch, seq, args.vocab, device)
    for p in progs:
        C.require_close(p.name, C.check_numerics(ref, p.model, tokens, targets))
    del ref
    for _ in range(2):  # warm-up: AdamW state exists from here on
        for p in progs:
            C.step(p, tokens, targets)
    got: dict[str, list[tuple[int, int]]] = {p.name: [] for p in progs}
    for i in range(args.rounds):
        for p in (progs if i % 2 == 0 else progs[::-1]):
            got[p.name].append(measure(p, tokens, targets, device))
    row: dict = {"sp": "on" if sp else "off", "batch": batch, "seq": seq}
    for name, vals in got.items():
        t = [v[1] for v in vals]
        v = torch.tensor([vals[0][0], C.median(t), max(t)], dtype=torch.float64, device=device) / MiB
        per_rank = [torch.empty_like(v) for _ in range(dist.get_world_size())]
        dist.all_gather(per_rank, v)
        static, transient, transient_max = torch.stack(per_rank).amax(0).tolist()  # largest rank
        row[f"{name}_static_mib"], row[f"{name}_transient_mib"] = static, transient
        row[f"{name}_peak_mib"], row[f"{name}_peak_max_mib"] = static + transient, static + transient_max
        row[f"{name}_peak_mib_per_rank"] = [round((r[0] + r[1]).item(), 2) for r in per_rank]
    row["ratio"] = row["tpcompile_peak_mib"] / row["hand_peak_mib"]
    row["transient_ratio"] = row["tpcompile_transient_mib"] / row["hand_transient_mib"]
    return row


COLUMNS = [("sp", "SP", ""), ("batch", "batch", ""), ("seq", "seq", ""),
           ("tpcompile_static_mib", "static MiB (tpc)", ".1f"),
           ("hand_static_mib", "static MiB (hand)", ".1f"),
           ("tpcompile_transient_mib", "transient MiB (tpc)", ".1f"),
           ("hand_transient_mib", "transient MiB (hand)", ".1f"),
           ("tpcompile_peak_mib", "peak MiB (tpc)", ".1f"), ("hand_peak_mib", "peak MiB (hand)", ".1f"),
           ("tpcompile_peak_max_mib", "peak max MiB (tpc)", ".1f"),
           ("hand_peak_max_mib", "peak max MiB (hand)", ".1f"),
           ("ratio", "peak tpc/hand", ".3f"), ("transient_ratio", "transient tpc/hand", ".3f")]


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="measured steps per program")
    args = p.parse_args()
    mesh, device = C.init(args.dp, args.loss_parallel)
    rows = [run_case(mesh, device, args, sp, b, s)
            for sp in C.sp_modes(args.sp) for b, s in C.sizes(args.sizes)]
    meta = {"what": "memory", "layers": args.layers, "vocab": args.vocab, "device": device.type,
            **C.machine()}
    C.emit(meta, rows, COLUMNS, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
