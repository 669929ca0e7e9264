"""The shared numerics harness: a persistent group of gloo workers, and the comparison
of a parallel module against the unsharded original (outputs and every gradient).

Starting processes costs seconds; a test or a hypothesis example costs milliseconds. So
the workers are started once per test session and fed jobs: ``pool.run(fn, *args)`` runs
``fn(rank, *args)`` on every rank (``fn`` must be importable: a module-level function) and
returns the per-rank results. A job that fails on some ranks only, or hangs, gets the
pool restarted so the next job starts clean. Every restart is logged with its reason
(``pool.restart_log``): the test session fails at the end if a test needed one it did not
declare (``@pytest.mark.pool_restart``; tests/conftest.py), so a crash that passes on
retry is never forgotten.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpcompile.verify import full, rel_err

JOB_TIMEOUT_S = 300.0
_MESHES: dict[tuple, Any] = {}


class WorkerError(RuntimeError):
    """A job raised on a worker; carries that worker's traceback text."""


def _serve(rank: int, world: int, store_path: str, jobs: Any, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            results.put((rank, True, fn(rank, *args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
            results.put((rank, False, (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world: int) -> None:
        self.world = world
        self._procs: list[Any] = []
        self.restart_log: list[str] = []  # why the pool was restarted, in order
        self._start()

    @property
    def restarts(self) -> int:
        return len(self.restart_log)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="tpc-pool-")
        self._jobs = [ctx.Queue() for _ in range(self.world)]
        self._results = ctx.Queue()
        store = os.path.join(self._tmp, "store")
        self._procs = [ctx.Process(target=_serve, args=(r, self.world, store, self._jobs[r],
                                                        self._results), daemon=True)
                       for r in range(self.world)]
        for p in self._procs:
            p.start()

    def close(self) -> None:
        for q in self._jobs:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def restart(self, why: str) -> None:
        for p in self._procs:
            p.kill()
        self.restart_log.append(why)
        self._start()

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> list[Any]:
        """``[fn(rank, *args, **kwargs) for each rank]``, run concurrently on the workers.
        Raises ``WorkerError`` if a rank raised. A job the pool itself lost (a worker
        died, or nothing came back in time) is run once more on a fresh pool: that is the
        infrastructure failing, not the job; a second loss is reported."""
        for attempt in (1, 2):
            got, lost = self._collect(fn, args, kwargs)
            if lost is None:
                break
            self.restart(f"job {fn.__name__}, attempt {attempt}: {lost}")
            if attempt == 2:
                raise WorkerError(f"job {fn.__name__}: {lost} (ranks done: {sorted(got)}), "
                                  "twice; pool restarted")
        failed = {r: v for r, (ok, v) in got.items() if not ok}
        if failed:
            # A rank that raised may have left the others in a collective until the gloo
            # timeout, which breaks the group's connections: start clean. (Jobs return the
            # errors a test expects as values; an exception here is always unexpected.)
            r, (name, msg, tb) = min(failed.items())
            self.restart(f"job {fn.__name__}: rank {r} raised {name}: {msg[:200]}")
            raise WorkerError(f"rank {r} raised {name}: {msg}\n{tb}")
        return [got[r][1] for r in range(self.world)]

    def _collect(self, fn: Callable, args: tuple, kwargs: dict
                 ) -> tuple[dict[int, tuple[bool, Any]], str | None]:
        """Send the job, gather one result per rank: (results, why the job was lost)."""
        for q in self._jobs:
            q.put((fn, args, kwargs))
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while len(got) < self.world:
            try:
                rank, ok, val = self._results.get(timeout=5.0)
                got[rank] = (ok, val)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    return got, f"worker(s) {dead} died (exit codes " \
                                f"{[self._procs[r].exitcode for r in dead]})"
                if time.monotonic() > deadline:
                    return got, f"no result within {JOB_TIMEOUT_S}s"
        return got, None


# ----------------------------------------------------------------------------- on a worker

def mesh(shape: tuple[int, ...], names: tuple[str, ...] | None = None) -> Any:
    """A cached DeviceMesh on this worker (new process groups are costly to create)."""
    from torch.distributed.device_mesh import init_device_mesh
    key = (shape, names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[key]


def tp_mesh(tp: int) -> Any:
    """A 1-D tensor-parallel mesh of size ``tp`` carved out of the whole world (ranks in
    other slices run the same job on their own slice)."""
    world = dist.get_world_size()
    if tp == world:
        return mesh((tp,), ("tp",))
    return mesh((world // tp, tp), ("rep", "tp"))["tp"]


@dataclass
class Report:
    """The worst relative error of the outputs and of each parameter's gradient."""

    output_err: float
    grad_errs: dict[str, float]

    @property
    def worst(self) -> tuple[str, float]:
        name, err = max(self.grad_errs.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (name, err) if err > self.output_err else ("<output>", self.output_err)


def default_loss(out: Any) -> torch.Tensor:
    """A loss that weighs every element of a sample differently, so no gradient is
    symmetric. The weights do not depend on the batch row and the sum is divided by the
    element count, so the loss of a full batch is the mean of its data-parallel shares'."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    total = 0
    for o in outs:
        per_row = o[0].numel() if o.ndim else 1
        w = torch.linspace(0.5, 1.5, per_row, dtype=torch.float64).view(o.shape[1:])
        total = total + (o.double().pow(2) * w).sum() / o.numel()
    return total  # type: ignore[return-value]


def compare(ref: torch.nn.Module, par: torch.nn.Module, inputs: tuple,
            loss_fn: Callable[[Any], torch.Tensor] = default_loss,
            dp: tuple[int, int] | None = None) -> Report:
    """Forward and backward both modules on ``inputs``; compare outputs and every grad.
    Parameters are matched by name; one missing on either side fails the comparison.
    ``dp=(dp_rank, dp_size)``: the parallel module gets this dp rank's rows of the batch
    (FSDP averages gradients over dp), the reference the whole batch."""
    def rows(x: Any) -> Any:
        return x.chunk(dp[1], 0)[dp[0]] if dp and isinstance(x, torch.Tensor) else x

    out_ref, out_par = ref(*inputs), par(*(rows(x) for x in inputs))
    loss_fn(out_ref).backward()
    loss_fn(out_par).backward()
    o_ref = out_ref if isinstance(out_ref, (tuple, list)) else (out_ref,)
    o_par = out_par if isinstance(out_par, (tuple, list)) else (out_par,)
    o_ref = tuple(rows(o) for o in o_ref)
    out_err = max(rel_err(full(a), b) for a, b in zip(o_par, o_ref))
    ref_params = dict(ref.named_parameters())
    par_params = dict(par.named_parameters())
    if set(ref_params) != set(par_params):
        raise AssertionError(f"parameter names differ: {set(ref_params) ^ set(par_params)}")
    # A gradient that is zero in exact arithmetic (a key bias: softmax ignores a shift of
    # all scores) is float noise of the size of the other gradients' terms; measure such
    # tiny gradients against 1% of the model's largest gradient entry, not against noise.
    floor = 0.01 * max((p.grad.abs().max().item() for p in ref_params.values()
                        if p.grad is not None and p.grad.numel()), default=1e-4)
    errs = {}
    for name, p in ref_params.items():
        q = par_params[name]
        if p.grad is None or q.grad is None:
            errs[name] = 0.0 if p.grad is None and q.grad is None else float("inf")
            continue
        errs[name] = rel_err(full(q.grad), p.grad, floor)
    return Report(out_err, errs)


def numerics_result(ref: torch.nn.Module, par: torch.nn.Module, inputs: tuple) -> dict:
    """``compare`` as a job's picklable result: errors and the styles the plan applied."""
    from tpcompile import plan_of
    rep = compare(ref, par, inputs)
    return {"error": None, "output": rep.output_err, "grads": rep.grad_errs,
            "styles": plan_of(par).layer_styles()}
