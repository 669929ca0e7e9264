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
import faulthandler
import os
import queue
import signal
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpcompile.verify import (NumericsMismatch, Report, Shadow, assert_match,  # noqa: F401
                              compare, full, shadow)

JOB_TIMEOUT_S = 300.0
_MESHES: dict[tuple, Any] = {}


class WorkerError(RuntimeError):
    """A job raised on a worker; carries that worker's traceback text."""


def _serve(rank: int, world: int, store_path: str, jobs: Any, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # on SIGUSR1 (a job that timed out), every thread's Python stack to a file the pool
    # reads into its restart log
    stacks = open(_stacks_file(store_path, rank), "w")  # noqa: SIM115 - for the process's life
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
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


def _stacks_file(store_path: str, rank: int) -> str:
    return os.path.join(os.path.dirname(store_path), f"stacks.{rank}")


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

    def _stacks(self, done: set[int]) -> str:
        """Where each rank that gave no result is (its Python stacks, innermost frames)."""
        out = []
        for r, p in enumerate(self._procs):
            if r in done or not p.is_alive():
                continue
            os.kill(p.pid, signal.SIGUSR1)
        time.sleep(2.0)
        for r in range(self.world):
            if r in done:
                continue
            try:
                with open(_stacks_file(os.path.join(self._tmp, "store"), r)) as f:
                    text = f.read()
            except OSError:
                continue
            blocks = text.strip().split("\n\n")
            main = next((b for b in blocks if b.startswith("Current thread")), blocks[-1])
            out.append(f"\n  rank {r}:\n" + "\n".join(main.strip().splitlines()[:25]))
        return "".join(out)

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
                    return got, f"no result within {JOB_TIMEOUT_S}s" + self._stacks(set(got))
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


def raised(fn: Callable[[], Any]) -> tuple[str, str] | None:
    """``(error class, message)`` of the tpcompile error ``fn()`` raises; None if none."""
    from tpcompile import TPCompileError
    try:
        fn()
    except TPCompileError as e:
        return type(e).__name__, str(e)
    return None


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, containers rebuilt as they were
    (tuples, named tuples, lists, dicts, Hugging Face ``ModelOutput``)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        items = {k: map_tensors(fn, v) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:
            return type(obj)(**items)  # a ModelOutput (a dataclass) or a dict subclass
        except TypeError:
            return type(obj)(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor in an output structure, in order."""
    found: list[torch.Tensor] = []
    map_tensors(found.append, obj)
    return found


def default_loss(out: Any) -> torch.Tensor:
    """A loss over every floating tensor of the output structure that weighs every
    element of a sample differently, so no gradient is symmetric. The weights do not
    depend on the batch row and the sum is divided by the element count, so the loss of a
    full batch is the mean of its data-parallel shares'."""
    total = 0
    for o in tensors_of(out):
        if not o.is_floating_point():
            continue
        per_row = o[0].numel() if o.ndim else 1
        w = torch.linspace(0.5, 1.5, per_row, dtype=torch.float64).view(o.shape[1:])
        total = total + (o.double().pow(2) * w).sum() / o.numel()
    return total  # type: ignore[return-value]


def shadow_of(ref: torch.nn.Module, inputs: tuple,
              loss_fn: Callable[[Any], torch.Tensor] = default_loss,
              kwargs: dict | None = None) -> Shadow | None:
    """The reference's float64 runs on ``inputs`` (forward and ``loss_fn`` backward), for
    the judge to tell true zeros and rounding noise (``tpcompile.verify.shadow``)."""
    as64, kw64 = map_tensors(lambda t: t.double() if t.is_floating_point() else t,
                             (inputs, kwargs or {}))

    def step(model: torch.nn.Module) -> Any:
        out = model(*as64, **kw64)
        loss_fn(out).backward()
        return out
    return shadow(ref, step)


def judge(ref: torch.nn.Module, par: torch.nn.Module, inputs: tuple,
          loss_fn: Callable[[Any], torch.Tensor] = default_loss,
          dp: tuple[int, int] | None = None, with_shadow: bool = True,
          after_backward: Callable[[torch.nn.Module], Any] | None = None,
          kwargs: dict | None = None, **options: Any) -> Report:
    """The reference's float64 shadow, then forward and backward of the reference and of
    the parallel module on ``inputs``, then ``tpcompile.verify.compare`` on this rank
    (``options`` go to it; ``after_backward(par)`` runs before it).
    ``dp=(dp_rank, dp_size)``: the parallel module gets this dp rank's rows of the batch
    (FSDP averages gradients over dp), the reference the whole batch, and the outputs
    are compared on this rank's rows. ``kwargs``: keyword inputs of the call (split over
    dp like ``inputs``)."""
    def rows(x: Any) -> Any:
        return map_tensors(lambda t: t.chunk(dp[1], 0)[dp[0]], x) if dp else x

    kwargs = kwargs or {}
    sh = shadow_of(ref, inputs, loss_fn, kwargs) if with_shadow else None  # the state before
    out_ref, out_par = ref(*inputs, **kwargs), par(*rows(inputs), **rows(kwargs))
    loss_fn(out_ref).backward()
    loss_fn(out_par).backward()
    if after_backward is not None:
        after_backward(par)
    return compare(ref, par, rows(out_ref), out_par,
                   shadow=sh.map_outputs(rows) if sh is not None else None, **options)


def numerics_result(ref: torch.nn.Module, par: torch.nn.Module, inputs: tuple,
                    **options: Any) -> dict:
    """``judge`` as a job's picklable result: this rank's report and the applied styles."""
    from tpcompile import plan_of
    return {"error": None, "report": judge(ref, par, inputs, **options),
            "styles": plan_of(par).layer_styles()}


# ----------------------------------------------------------------------------- in the parent

def assert_numerics(results: list[dict], rtol: float | None = None, context: str = "") -> None:
    """The parent's verdict on a numerics job: every rank ran the comparison (no
    error), each rank's report passes, the ranks of each tp group agree (replicated
    tensors bit-identical), with the tolerance ``rtol`` where given. Raises
    ``NumericsMismatch``."""
    errors = [(i, r.get("error"), r.get("message", "")) for i, r in enumerate(results)
              if r.get("error")]
    assert not errors, f"{context}: not compared: {errors}"
    reports = [r["report"] for r in results]
    assert len(reports) == len(results) and all(isinstance(r, Report) for r in reports)
    if rtol is not None:
        assert all(r.rtol == rtol for r in reports), [r.rtol for r in reports]
    assert_match(reports, context)
    assert all(any(c.kind == "grad" for c in r.checks) for r in reports), "no gradients compared"
