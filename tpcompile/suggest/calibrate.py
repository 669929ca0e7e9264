"""``tpcompile.calibrate()``: measure this machine into a device preset, in seconds.

Every rank of the job calls it (under torchrun; a single process measures compute only).
It times, with every rank busy at once as in training:

* a square and a skinny matmul (achieved FLOP/s and Hockney's half-performance size),
  one elementwise op over a large tensor (bytes/s), a chain of tiny ops run forward and
  backward (host and autograd overhead per op), an fp32 cross-entropy (per logit);
* all-reduce, all-gather and reduce-scatter (the c10d functional ops the rewrite issues)
  at a few sizes on every group size the mesh can have, both as contiguous groups (a tp
  dim) and strided ones (a dp dim), each group level ``intra`` or ``inter`` node, and
  fits ``alpha + beta * bytes`` per collective, kind and group size. Each collective is
  timed between matmuls, as in a step, and charged what it adds to them: on a CPU with
  more ranks than cores that includes waiting for every rank to be scheduled, which
  costs more than the collective run alone;
* a matmul under an all-gather in flight: how much communication hides under compute.

The slowest rank's time counts. Rank 0 writes the preset to ``path`` (JSON or YAML).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .devices import PRESETS, CollectiveFit, DevicePreset, Link, save_device
from .source import dtype_of

KINDS = ("all_reduce", "all_gather", "reduce_scatter")
_f = torch.ops._c10d_functional


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _slowest(seconds: float) -> float:
    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective(kind: str, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    name, size = group.group_name, dist.get_world_size(group)
    if kind == "all_reduce":
        y = _f.all_reduce(x, "sum", name)
    elif kind == "all_gather":
        y = _f.all_gather_into_tensor(x, size, name)
    else:
        y = _f.reduce_scatter_tensor(x, "sum", size, name)
    return _f.wait_tensor(y)


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``t = alpha + beta * bytes`` (both >= 0)."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    var = sum((b - mx) ** 2 for b, _ in points)
    beta = max(sum((b - mx) * (t - my) for b, t in points) / var, 0.0) if var else 0.0
    return max(my - beta * mx, 0.0), beta


def _groups(world: int, g: int) -> list[list[list[int]]]:
    contiguous = [list(range(i * g, (i + 1) * g)) for i in range(world // g)]
    strided = [list(range(j, world, world // g)) for j in range(world // g)]
    return [contiguous] if strided == contiguous else [contiguous, strided]


PAIRS = 4  # (compute, collective) pairs per timed sample: skew between ranks builds up


def _measure_collectives(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...],
                         repeats: int, per_node: int, work: torch.Tensor) -> list[CollectiveFit]:
    """Each collective between matmuls, ``PAIRS`` in a row without a barrier, charged the
    time it adds to the matmuls alone."""
    world = dist.get_world_size()
    _barrier()
    alone = _slowest(_median_seconds(lambda: [work @ work for _ in range(PAIRS)], device, repeats))
    fits = []
    for g in [d for d in range(2, world + 1) if world % d == 0]:
        points: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
        for layout in _groups(world, g):
            mine, _ = dist.new_subgroups_by_enumeration(layout)
            nodes = len({r // per_node for r in layout[0]})
            level, on_node = ("intra", 1) if nodes == 1 else ("inter", g // nodes)
            for kind in KINDS:
                for nbytes in sizes:
                    numel = max(nbytes // dtype.itemsize // g * g, g)
                    x = torch.ones(numel // g if kind == "all_gather" else numel, dtype=dtype,
                                   device=device)
                    _barrier()
                    t = _median_seconds(lambda: [(work @ work, _collective(kind, x, mine))
                                                 for _ in range(PAIRS)], device, repeats)
                    points.setdefault((kind, level, on_node), []).append(
                        (numel * dtype.itemsize, max(_slowest(t) - alone, 0.0) / PAIRS))
        for (kind, level, on_node), pts in points.items():
            alpha, beta = _fit(pts)
            fits.append(CollectiveFit(kind=kind, level=level, group=g, per_node=on_node,  # type: ignore[arg-type]
                                      alpha=alpha, beta=beta))
    return fits


def _overlap(device: torch.device, dtype: torch.dtype, work: torch.Tensor, repeats: int) -> float:
    """Fraction of an all-gather (FSDP's prefetch) that hides under a matmul issued while
    it is in flight."""
    group = dist.group.WORLD
    x = torch.ones(2**20 // dtype.itemsize, device=device, dtype=dtype)

    def mm() -> None:
        for _ in range(PAIRS):
            work @ work

    def comm() -> None:
        for _ in range(PAIRS):
            _collective("all_gather", x, group)

    def both() -> None:
        for _ in range(PAIRS):
            y = _f.all_gather_into_tensor(x, dist.get_world_size(), group.group_name)
            work @ work
            _f.wait_tensor(y)
    t_mm, t_comm, t_both = (_slowest(_median_seconds(fn, device, repeats)) for fn in (mm, comm, both))
    hidden = t_mm + t_comm - t_both
    return min(max(hidden / min(t_mm, t_comm), 0.0), 1.0) if min(t_mm, t_comm) > 0 else 0.0


def _link(fits: list[CollectiveFit], level: str, base: Link) -> Link:
    """A ring link that reproduces the measured all-gather of the largest group, for
    group sizes no fit covers."""
    ag = [f for f in fits if f.kind == "all_gather" and f.level == level]
    if not ag:
        return base
    f = max(ag, key=lambda f: f.group)
    bw = (f.group - 1) / f.group / f.beta if f.beta > 0 else base.bandwidth
    return Link(bandwidth=bw, latency=f.alpha / (f.group - 1))


def calibrate(path: str | Path | None = None, *, name: str = "calibrated",
              dtypes: tuple[str, ...] | None = None, gpus_per_node: int | None = None,
              sizes: tuple[int, ...] = (2**12, 2**16, 2**20, 2**23), repeats: int = 5,
              base: str | None = None) -> DevicePreset:
    """Measure this machine (every rank calls it) and return a :class:`DevicePreset`;
    rank 0 also saves it to ``path`` for ``suggest(..., device=path)``.

    Args:
        dtypes: the matmul dtypes to time (default ``fp32`` on CPU, ``bf16`` on GPU).
        gpus_per_node: ranks per host (default ``LOCAL_WORLD_SIZE``, else the world).
        sizes: collective sizes in bytes of the full tensor.
        base: the preset whose unmeasured fields (memory reserve) are kept.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtypes = dtypes or (("bf16",) if cuda else ("fp32",))
    ref = PRESETS[base or ("h100-80gb" if cuda else "cpu-gloo")]
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    n = 4096 if cuda else 384
    peak, half = {}, 0.0
    for name_ in dtypes:
        dt = dtype_of(name_)
        a = torch.randn(n, n, device=device, dtype=dt)
        _barrier()
        square = 2 * n**3 / _slowest(_median_seconds(lambda: a @ a, device, repeats))
        # a skinny one (smallest dim n / 16): Hockney's rate(s) = r * s / (s + s_half)
        s_ = n // 16
        tall, thin = torch.randn(4 * n, n, device=device, dtype=dt), torch.randn(n, s_, device=device, dtype=dt)
        _barrier()
        skinny = 2 * 4 * n * n * s_ / _slowest(_median_seconds(lambda: tall @ thin, device, repeats))
        # square = r n / (n + h), skinny = r s / (s + h)  =>  h, then r
        ratio = skinny / square
        h = max((1 - ratio) * n * s_ / (ratio * n - s_), 0.0) if ratio * n > s_ else 0.0
        peak[name_], half = square * (n + h) / n, h
    big = torch.ones(2**26 if cuda else 2**24, device=device)
    _barrier()
    bandwidth = 2 * big.numel() * 4 / _slowest(_median_seconds(lambda: big * 2.0, device, repeats))
    tiny = torch.ones(64, device=device, requires_grad=True)

    def ops() -> None:  # 200 ops, forward and backward
        z = tiny
        for _ in range(100):
            z = z * 1.0001 + 0.1
        z.sum().backward()
    _barrier()
    overhead = _slowest(_median_seconds(ops, device, repeats)) / 200
    # the cross-entropy every step ends with (on a CPU its exp is compute-bound)
    rows, vocab = (8192, 32768) if cuda else (2048, 8192)  # out of cache, as logits are
    logits = torch.randn(rows, vocab, device=device, requires_grad=True)
    target = torch.randint(0, vocab, (rows,), device=device)
    _barrier()
    per_logit = _slowest(_median_seconds(
        lambda: torch.nn.functional.cross_entropy(logits, target).backward(), device,
        repeats)) / (rows * vocab)
    fits: list[CollectiveFit] = []
    overlap = ref.fsdp_overlap
    if world > 1:
        dt = dtype_of(dtypes[0])
        # a matmul of about 4 ms (a layer's worth on a CPU) between collectives
        side = n if cuda else max(int((peak[dtypes[0]] * 0.004 / 2) ** (1 / 3)), 64)
        work = torch.randn(side, side, device=device, dtype=dt)
        fits = _measure_collectives(device, dt, sizes, repeats, per_node, work)
        overlap = _overlap(device, dt, work, repeats)
    if cuda:
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // per_node
    preset = DevicePreset(
        name=name, memory_bytes=int(memory), reserved_bytes=min(ref.reserved_bytes, int(memory) // 4),
        peak_flops=peak, matmul_efficiency=1.0, matmul_half_size=half, memory_bandwidth=bandwidth,
        op_overhead=overhead, loss_per_logit=per_logit,
        intra=_link(fits, "intra", ref.intra), inter=_link(fits, "inter", ref.inter),
        fsdp_overlap=overlap, gpus_per_node=per_node, fits=fits,
        source=f"calibrated on {socket.gethostname()}, {world} ranks, "
               f"{device.type}/{dist.get_backend() if dist.is_initialized() else 'none'}, "
               f"{time.strftime('%Y-%m-%d %H:%M')}")
    if path is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        save_device(preset, path)
    _barrier()
    return preset

