"""The judge: does a parallel module compute what the unsharded original computes?

The tests, the property suite and the benchmarks all decide with this module.

**On each rank**, after forward and backward of both modules, :func:`compare` checks what
this rank holds, and returns a :class:`Report`:

- outputs, as a whole structure: the same container types (tuple, list, dict, a Hugging
  Face ``ModelOutput``), the same keys in the same order, the same lengths, ``None``
  where the reference has ``None``, equal non-tensor leaves; every tensor a plain
  ``torch.Tensor`` (a DTensor only where the caller says the program returns sharded
  outputs, as ``loss_parallel=True`` does) and equal to the reference's;
- parameters: the same names; each one placed on the tp mesh as the plan says
  (``Shard`` / ``Replicate``), never ``Partial``; its local values exactly those of the
  reference (the part this rank holds);
- gradients: each parameter's *local* gradient (what this rank's optimizer sees) against
  the matching part of the reference gradient, never through ``full_tensor()``, which
  performs a pending reduction and so hides a gradient left ``Partial``; the reference
  must have a gradient for every parameter it is compared on.

**Across ranks**, :func:`verdict` (or :func:`assert_match`) reads the reports of all
ranks (collected by the test's worker pool, or by :func:`gather` under torchrun): every
rank must pass, every rank of a tp group must have checked the same things, and every
tensor that is replicated over tp (outputs, ``Replicate`` gradients) must be
bit-identical on all ranks of the group. The shards of a sharded tensor each equal their
slice of the reference, so together they assemble to it.

**Error measure**, per tensor (this rank's part of it), in float64, with ``want`` the
reference's tensor: ``||got - want||₂ / ||want||₂ <= rtol``, and where the reference is
exactly zero (and its float64 run too) the parallel value must be exactly zero. There is
no floor shared across tensors: a small parameter's gradient is held to rtol of itself.

One thing float32 cannot do is know a tensor that is zero in exact arithmetic (a key
bias's gradient: softmax ignores a shift of all scores): the reference then holds
rounding noise, and the parallel program other noise. A :class:`Shadow` measures that
noise: the reference run again in float64 (``exact``), and in float64 with every op's
result perturbed by float32's unit roundoff (Monte Carlo arithmetic: how far float32
rounding moves each tensor). The reference's noise on a tensor is the larger of
``||want - exact||`` and the perturbed runs' spread (root mean square per element,
pooled over the whole tensor). A tensor that misses rtol still passes if
``||got - exact|| <= NOISE_FACTOR * noise``: the parallel value is about as accurate as
float32 can be there at all. On a tensor float32 does know (noise ~1e-7 relative) that
allows ~1e-6, under rtol; on a noise tensor a fault shows as the size of the tensor's
terms, ~1e6 times the noise. Without a shadow every tensor is held to rtol.

``rtol``: float32 5e-5 (the float32 reference itself differs from a float64 run by up to
1.7e-5 on a norm weight's gradient, and the parallel program sums in another order),
float64 1e-10. Real faults show as 1e-3 and more.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

RTOL: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 5e-5,
                                  torch.bfloat16: 2e-2, torch.float16: 2e-3}
# On a tensor the float32 reference only knows to rounding noise: how many times that
# noise the parallel value may be away from the float64 result. The parallel program
# runs more ops (partial sums, then a reduction) and is typically 2-3 times noisier.
NOISE_FACTOR = 16.0
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
NOISE_SAMPLES = 2  # noisy float64 runs per shadow


class NumericsMismatch(AssertionError):
    """The parallel module does not compute the reference's numbers (or its layouts are
    not the promised ones). Carries every problem found, on every rank."""


@dataclass
class Check:
    """One thing the judge looked at on one rank."""

    kind: str  # "output", "grad", "param", "structure"
    name: str  # "output[0]", "output.logits", "layers.0.mlp.w1.weight", ...
    ok: bool
    err: float = 0.0  # relative error of this rank's part (inf: not comparable)
    bound: float = 0.0  # the relative error it was allowed
    detail: str = ""  # why it failed
    digest: str | None = None  # hash of the local values of a tensor replicated over tp
    noisy: bool = False  # passed as rounding noise: near the float64 shadow, not the reference

    def describe(self) -> str:
        nums = f" (error {self.err:.3g} > allowed {self.bound:.3g})" \
            if not self.detail and math.isfinite(self.err) else ""
        return f"{self.kind} {self.name}: {self.detail or 'values differ'}{nums}"


@dataclass
class Report:
    """What :func:`compare` found on one rank. Picklable (plain fields only)."""

    rank: int
    group: tuple[int, ...]  # global ranks of this rank's tp group
    rtol: float
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def errors(self, kind: str) -> dict[str, float]:
        """Relative error by name, for one kind of check ("grad", "output", ...)."""
        return {c.name: c.err for c in self.checks if c.kind == kind}

    @property
    def worst(self) -> tuple[str, float, float]:
        """(name, relative error, allowed) of the tensor closest to its bound."""
        tensors = [c for c in self.checks if c.kind != "structure"]
        if not tensors:
            return ("-", 0.0, 0.0)
        c = max(tensors, key=_used)
        return (c.name, c.err, c.bound)


def _used(c: Check) -> float:
    """How much of its allowance a check used (> 1: failed)."""
    if c.err == 0:
        return 0.0
    return c.err / c.bound if c.bound > 0 else math.inf


# ----------------------------------------------------------------------------- tensors

def default_rtol(dtype: torch.dtype) -> float:
    return RTOL.get(dtype, RTOL[torch.float32])


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor a sharded or replicated DTensor stands for; plain tensors as they
    are. Refuses ``Partial``: ``full_tensor()`` would perform the pending reduction and
    so make a missing one look done."""
    if isinstance(t, DTensor):
        if any(p.is_partial() for p in t.placements):
            raise ValueError(f"full(): a DTensor with placements {t.placements} has a "
                             "reduction pending; compare its local values instead")
        return t.full_tensor()
    return t


def tp_dim(t: DTensor) -> int:
    """Which dim of ``t``'s mesh is tensor parallel: the only one, or the one named "tp"."""
    mesh = t.device_mesh
    if mesh.ndim == 1:
        return 0
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        raise ValueError(f"cannot tell the tp dim of mesh {mesh} (names {names})")
    return names.index("tp")


def local_part(whole: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The part of the full tensor ``whole`` that this rank holds under ``like``'s mesh
    and placements (no communication)."""
    from .runtime.distribute import shard_like
    return shard_like(whole.detach().to(like.device), like).to_local()


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().reshape(-1).cpu()
    h = hashlib.sha1(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_tensor(name: str, got: Any, want: torch.Tensor, *, kind: str = "output",
                 rtol: float | None = None, exact: torch.Tensor | None = None,
                 noisy: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]] = (),
                 placement: Placement | None = None, dtensor: bool = True) -> Check:
    """One tensor of the parallel module (``got``, on this rank: plain or a DTensor)
    against the reference's full tensor ``want``. ``exact`` / ``noisy``: the same tensor
    from the reference's :class:`Shadow` (the float64 run, and the runs under simulated
    float32 rounding; a callable to make them only if needed), to tell true zeros and
    the reference's own noise. ``placement``:
    the placement ``got`` must have on the tp mesh (a plain tensor counts as
    ``Replicate``). ``dtensor=False``: ``got`` must be a plain ``torch.Tensor``."""
    rtol = default_rtol(want.dtype) if rtol is None else rtol

    def fail(why: str) -> Check:
        return Check(kind, name, False, math.inf, rtol, why)

    full_exact = exact
    as_dtensor = got if isinstance(got, DTensor) else None
    if not isinstance(got, torch.Tensor):
        return fail(f"expected a tensor, got {type(got).__name__}")
    replicated = True
    if isinstance(got, DTensor):
        if not dtensor:
            return fail(f"a DTensor {tuple(got.placements)}; a plain torch.Tensor is due")
        pls = tuple(got.placements)
        if any(p.is_partial() for p in pls):
            return fail(f"placements {pls} hold a Partial: a reduction is still pending")
        if tuple(got.shape) != tuple(want.shape):
            return fail(f"global shape {list(got.shape)}, reference {list(want.shape)}")
        on_tp = pls[tp_dim(got)]
        if placement is not None and on_tp != placement:
            return fail(f"placed {on_tp} on the tp mesh; the plan says {placement}")
        replicated = isinstance(on_tp, Replicate)
        want = local_part(want, got)
        exact = None if exact is None else local_part(exact, got)
        got = got.to_local()
    elif kind == "output" and type(got) is not torch.Tensor:
        return fail(f"a {type(got).__name__}; a plain torch.Tensor is due")
    elif placement is not None and not isinstance(placement, Replicate):
        return fail(f"a plain tensor; the plan says {placement} on the tp mesh")
    if got.dtype != want.dtype:
        return fail(f"dtype {got.dtype}, reference {want.dtype}")
    if tuple(got.shape) != tuple(want.shape):
        return fail(f"shape {list(got.shape)} on this rank, its part of the reference "
                    f"{list(want.shape)}")
    digest = _digest(got) if replicated else None
    a, b = got.detach().double(), want.detach().double()
    bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
    if bad_a.any() or bad_b.any():
        same = torch.equal(bad_a, bad_b) and torch.equal(a.isnan(), b.isnan()) and \
            torch.equal(a[bad_a & ~a.isnan()], b[bad_b & ~b.isnan()])
        if not same:
            return Check(kind, name, False, math.inf, rtol, f"{int(bad_a.sum())} non-finite "
                         f"entries, reference {int(bad_b.sum())}", digest)
        a, b = a.masked_fill(bad_a, 0.0), b.masked_fill(bad_b, 0.0)
        exact = None  # the shadow cannot say anything sensible here
    norm = torch.linalg.vector_norm
    s, e = norm(b).item(), norm(a - b).item()
    err = e / s if s > 0 else (0.0 if e == 0 else math.inf)
    noise, e_exact = 0.0, math.inf
    zero = b == 0
    if exact is not None:
        c = exact.detach().double()
        zero &= c == 0  # a true zero is zero in float64 too
        if e > rtol * s or bool((a[zero] != 0).any()):  # is this tensor rounding noise?
            # the noisy runs' spread per element, pooled over the whole tensor (all its
            # elements are computed alike): a shard of one or two elements gets a stable
            # scale too
            runs = noisy() if callable(noisy) else noisy
            spread = _spread(full_exact, runs) if len(runs) else 0.0  # type: ignore[arg-type]
            noise = max(norm(b - c).item(), spread * math.sqrt(b.numel()))
            e_exact = norm(a - c).item()
            if noise > rtol * s:  # it is: it has no true zeros either
                zero = torch.zeros_like(zero)
            for run in runs:  # a true zero stays zero under rounding noise too; an entry
                # that is zero by luck of rounding (float32 and float64 alike) does not
                part = run if as_dtensor is None else local_part(run, as_dtensor)
                if tuple(part.shape) == tuple(zero.shape):
                    zero &= part.detach().double() == 0
    stray = int((a[zero] != 0).sum())
    if stray:
        return Check(kind, name, False, math.inf, rtol,
                     f"{stray} entries nonzero where the reference is exactly zero", digest)
    if e <= rtol * s:
        return Check(kind, name, True, err, rtol, "", digest)
    if e_exact <= NOISE_FACTOR * noise:  # as accurate as float32 can know this tensor
        scale = s or noise  # (noise > 0 here: else got == exact != want == 0)
        return Check(kind, name, True, e_exact / scale, NOISE_FACTOR * noise / scale, "",
                     digest, True)
    why = "" if exact is None else (
        f"; nor within {NOISE_FACTOR:g} times the reference's rounding noise of the float64 "
        f"result ({e_exact:.3g} > {NOISE_FACTOR * noise:.3g})")
    return Check(kind, name, False, err, rtol, f"values differ (error {err:.3g} > allowed "
                 f"{rtol:.3g}{why})", digest)


def _spread(exact: torch.Tensor, noisy: Sequence[torch.Tensor]) -> float:
    """Root mean square, over the noisy runs and the elements, of ``noisy - exact``."""
    c = exact.detach().double()
    if not c.numel() or not torch.isfinite(c).all():
        return 0.0
    sq = sum(torch.linalg.vector_norm(t.detach().double() - c).item() ** 2 for t in noisy)
    return math.sqrt(sq / (len(noisy) * c.numel()))


class RoundingNoise(TorchDispatchMode):
    """Monte Carlo arithmetic: every floating result of an op (not views, not in-place
    ops) multiplied by ``1 + u * r``, ``r`` uniform in [-1, 1], ``u`` a unit roundoff.
    On a float64 model, the results spread as far as that much rounding per op moves
    them: how precisely a lower precision can know each tensor at all."""

    def __init__(self, seed: int, unit_roundoff: float = UNIT_ROUNDOFF[torch.float32]) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)
        self.u = unit_roundoff

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return out
        return tree_map_only(torch.Tensor, self._perturb, out)

    def _perturb(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or not t.numel() or type(t) is not torch.Tensor:
            return t
        r = torch.rand(t.shape, generator=self.gen, dtype=torch.float64)
        return t * (1 + self.u * (2 * r - 1)).to(t.dtype).to(t.device)


class _NoisyRuns:
    """The noisy float64 runs of a shadow, made on first use from a float64 copy of the
    reference taken when the shadow was made."""

    def __init__(self, template: torch.nn.Module, step: Callable[[torch.nn.Module], Any],
                 samples: int, unit_roundoff: float) -> None:
        self.template, self.step, self.samples, self.u = template, step, samples, unit_roundoff
        self.runs: list[tuple[torch.nn.Module, Any]] | None = None

    def get(self) -> list[tuple[torch.nn.Module, Any]]:
        if self.runs is None:
            self.runs = [_run_copy(self.template, self.step, RoundingNoise(i, self.u))
                         for i in range(self.samples)]
        return self.runs


def _run_copy(template: torch.nn.Module, step: Callable[[torch.nn.Module], Any],
              mode: Any = None) -> tuple[torch.nn.Module, Any]:
    model = copy.deepcopy(template)
    for p in model.parameters():
        p.grad = None
    with torch.random.fork_rng(devices=[]):
        if mode is None:
            return model, step(model)
        with mode:
            return model, step(model)


@dataclass
class Shadow:
    """The reference run in float64 (``exact``: the module, with its gradients, and
    ``outputs``), and, made only when a tensor needs them, float64 runs under
    :class:`RoundingNoise` (:attr:`noisy`); see the module doc."""

    exact: torch.nn.Module
    outputs: Any
    _noisy: _NoisyRuns
    _fn: Callable[[Any], Any] = lambda o: o

    @property
    def noisy(self) -> list[tuple[torch.nn.Module, Any]]:
        return [(m, self._fn(o)) for m, o in self._noisy.get()]

    def map_outputs(self, fn: Callable[[Any], Any]) -> "Shadow":
        """The same shadow with ``fn`` applied to every run's outputs (a dp rank's rows)."""
        inner = self._fn
        return Shadow(self.exact, fn(self.outputs), self._noisy, lambda o: fn(inner(o)))


def shadow(reference: torch.nn.Module, step: Callable[[torch.nn.Module], Any],
           samples: int = NOISE_SAMPLES) -> Shadow | None:
    """Run ``step(model)`` (forward and backward on float64 inputs; returns the outputs)
    on a float64 copy of ``reference``, and keep what it needs to run it ``samples``
    times more under :class:`RoundingNoise` of the reference's precision, should a
    tensor need them. ``None`` for a reference that is not in a lower precision than
    float64. The global random stream is untouched."""
    dtypes = {p.dtype for p in reference.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in UNIT_ROUNDOFF:
        return None
    template = copy.deepcopy(reference).double()
    for p in template.parameters():
        p.grad = None
    exact, outputs = _run_copy(template, step)
    return Shadow(exact, outputs,
                  _NoisyRuns(template, step, samples, UNIT_ROUNDOFF[next(iter(dtypes))]))


# ----------------------------------------------------------------------------- modules

def planned_placements(model: torch.nn.Module, plan: Any = None) -> dict[str, Placement]:
    """Parameter name -> the placement on the tp mesh that ``plan`` (default: the plan
    ``model`` was parallelized with) gives it: ``Shard`` for the sharded parameters of
    colwise / rowwise / vocab-parallel layers, ``Replicate`` for every other one. A
    layer stored transposed (GPT-2's ``Conv1D``, weight (in, out)) is sharded on the other
    weight dim, and a Parameter of experts on its out or in dim after the experts'; a
    fused projection the plan packs into parts holds each rank's slice of
    every part (``_StridedShard`` with the part count); a layer with fewer heads than tp
    (kv heads shared by groups of ranks) is ``Replicate``."""
    from torch.distributed.tensor.placement_types import _StridedShard

    from .analysis import param_role
    from .api import plan_of
    from .planning.value import PLACEMENTS, placement
    plan = plan or plan_of(model)
    styles = plan.layer_styles()
    packed = {(f"{member}.{rel}" if member else rel): parts for m in plan.modules
              for member in m.members for rel, parts in m.packed.items()}
    grouped = {(f"{member}.{rel}" if member else rel) for m in plan.modules
               for member in m.members for rel in m.grouped}
    experts = {(f"{member}.{rel}" if member else rel): kind for m in plan.modules
               for member in m.members for rel, kind in m.experts.items()}
    out: dict[str, Placement] = {}
    for name, _ in model.named_parameters():
        if name in experts:  # a 3-D Parameter of experts: a layer of its own
            pl = placement(experts[name], styles.get(name), "weight", packed.get(name))
            out[name] = Replicate() if pl is None else pl
            continue
        owner, pname = param_role(name)
        base = PLACEMENTS.get((styles.get(owner), pname))
        if base is None or owner in grouped:
            out[name] = Replicate()
            continue
        dim = base.dim
        if pname == "weight" and type(model.get_submodule(name.rpartition(".")[0])).__name__ == "Conv1D":
            dim = 1 - dim
        parts = packed.get(owner)
        out[name] = _StridedShard(dim, split_factor=parts) if parts else Shard(dim)
    return out


def _tp_group(module: torch.nn.Module) -> tuple[int, ...]:
    """Global ranks of this rank's tp group, read off the module's DTensor parameters."""
    for p in module.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            if mesh.ndim > 1:
                mesh = mesh[mesh.mesh_dim_names[tp_dim(p)]]  # type: ignore[index]
            return tuple(int(r) for r in mesh.mesh.flatten().tolist())
    return (dist.get_rank() if dist.is_initialized() else 0,)


def _walk(path: str, got: Any, want: Any, exact: Any, out: list[Check],
          noisy: Callable[[], list[Any]] | None = None, keys: tuple = (), **kw: Any) -> None:
    """Compare two output structures whole. ``exact``: the same structure from the
    shadow's float64 run (None: no shadow); ``noisy()``: the whole structures of its noisy
    runs (``keys``: where in them this part is)."""
    def bad(why: str) -> None:
        out.append(Check("structure", path, False, math.inf, 0.0, why))

    def deeper(p: str, g: Any, w: Any, k: Any) -> None:
        _walk(p, g, w, None if exact is None else exact[k], out, noisy, keys + (k,), **kw)

    if isinstance(want, torch.Tensor):
        def at() -> list[torch.Tensor]:
            found = []
            for o in noisy():  # type: ignore[misc]
                for k in keys:
                    o = o[k]
                found.append(o)
            return found
        out.append(check_tensor(path, got, want, kind="output", exact=exact,
                                noisy=at if noisy is not None else (), **kw))
    elif want is None or got is None:
        if got is not want:
            bad(f"{type(got).__name__}, reference {type(want).__name__}")
    elif type(got) is not type(want):
        bad(f"a {type(got).__name__}, reference a {type(want).__name__}")
    elif isinstance(want, Mapping):
        if list(got.keys()) != list(want.keys()):
            bad(f"keys {list(got.keys())}, reference {list(want.keys())}")
            return
        for k in want:
            deeper(f"{path}.{k}" if isinstance(k, str) else f"{path}[{k!r}]", got[k], want[k], k)
    elif isinstance(want, (tuple, list)):
        if len(got) != len(want):
            bad(f"length {len(got)}, reference {len(want)}")
            return
        for i, (g, w) in enumerate(zip(got, want)):
            deeper(f"{path}[{i}]", g, w, i)
    elif isinstance(want, float):
        rtol = kw.get("rtol") or RTOL[torch.float32]
        if not abs(got - want) <= rtol * abs(want):
            bad(f"{got!r}, reference {want!r}")
    elif got != want:
        bad(f"{got!r}, reference {want!r}")


def compare(reference: torch.nn.Module, parallel: torch.nn.Module, out_ref: Any, out_par: Any,
            *, rtol: float | None = None, shadow: Shadow | None = None,
            placements: Mapping[str, Placement] | str | None = "plan",
            dtensor_outputs: bool = False, param_rtol: float = 0.0,
            no_grad: Iterable[str] = (), group: tuple[int, ...] | None = None) -> Report:
    """Judge this rank's part of ``parallel`` against ``reference``, after forward and
    backward of both (``out_ref`` / ``out_par``: their outputs; pass the reference's
    rows this rank's data-parallel share saw when the batch was split over dp).

    ``shadow``: the reference's float64 runs on the same inputs (:func:`shadow`); it
    tells true zeros and the tensors the float32 reference only knows to rounding noise.
    ``placements``: parameter name -> expected placement on the tp mesh; ``"plan"``
    (default) reads them off the tpcompile plan of ``parallel``; ``None``: only
    "no Partial". ``dtensor_outputs``: outputs may be DTensors (sharded logits for a
    vocab-parallel loss); each rank's shard is compared with its slice.
    ``param_rtol``: how far parameter values may be off (0: bit for bit, as right after
    ``auto_parallelize``). ``no_grad``: parameters the loss does not reach, on purpose;
    any other parameter without a reference gradient fails the comparison.
    """
    ref_params = dict(reference.named_parameters())
    par_params = dict(parallel.named_parameters())
    dtype = next((p.dtype for p in ref_params.values() if p.is_floating_point()), torch.float32)
    rtol = default_rtol(dtype) if rtol is None else rtol
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = Report(rank, group or _tp_group(parallel), rtol)
    checks = report.checks
    sh_out = None if shadow is None else shadow.outputs
    noisy_out = None if shadow is None else (lambda: [o for _, o in shadow.noisy])
    _walk("output", out_par, out_ref, sh_out, checks, noisy_out, rtol=rtol,
          dtensor=dtensor_outputs)

    if placements == "plan":
        placements = planned_placements(parallel)
    placements = placements or {}
    if set(ref_params) != set(par_params):
        checks.append(Check("structure", "parameters", False, math.inf, 0.0,
                            f"names differ: only in the reference "
                            f"{sorted(set(ref_params) - set(par_params))}, only in the "
                            f"parallel module {sorted(set(par_params) - set(ref_params))}"))
    exact_params = {} if shadow is None else dict(shadow.exact.named_parameters())

    def noisy_grads(name: str) -> Callable[[], list[torch.Tensor]]:
        def get() -> list[torch.Tensor]:
            grads = [dict(m.named_parameters())[name].grad for m, _ in shadow.noisy]
            return [g for g in grads if g is not None]
        return get
    skip = set(no_grad)
    for name, p in ref_params.items():
        q = par_params.get(name)
        if q is None:
            continue
        want_pl = placements.get(name)  # type: ignore[union-attr]
        checks.append(check_tensor(name, q, p, kind="param", rtol=param_rtol,
                                   placement=want_pl))
        if name in skip or not p.requires_grad:
            if p.grad is not None or q.grad is not None:
                checks.append(Check("grad", name, False, math.inf, rtol,
                                    "has a gradient, but was expected to have none"))
            continue
        if p.grad is None:
            checks.append(Check("grad", name, False, math.inf, rtol,
                                "the reference has no gradient (the loss does not reach "
                                "it); pass no_grad= if that is meant"))
            continue
        if q.grad is None:
            checks.append(Check("grad", name, False, math.inf, rtol,
                                "no gradient in the parallel module"))
            continue
        if isinstance(q, DTensor) and isinstance(q.grad, DTensor) and \
                tuple(q.grad.placements) != tuple(q.placements):
            checks.append(Check("grad", name, False, math.inf, rtol,
                                f"gradient placed {tuple(q.grad.placements)}, the parameter "
                                f"{tuple(q.placements)}"))
            continue
        e = exact_params.get(name)
        exact = None if e is None else e.grad
        checks.append(check_tensor(name, q.grad, p.grad, kind="grad", rtol=rtol, exact=exact,
                                   noisy=noisy_grads(name) if exact is not None else (),
                                   placement=want_pl))
    return report


# ----------------------------------------------------------------------------- all ranks

def verdict(reports: Sequence[Report]) -> list[str]:
    """Every problem in the reports of all ranks, and across the ranks of each tp group
    (the same checks; replicated tensors bit-identical). Empty: the module matches."""
    problems = [f"rank {r.rank}: {c.describe()}" for r in reports for c in r.failures]
    if not reports:
        return ["no reports to judge"]
    groups: dict[tuple[int, ...], list[Report]] = {}
    for r in reports:
        groups.setdefault(r.group, []).append(r)
    for g, members in groups.items():
        ranks = sorted(r.rank for r in members)
        if ranks != sorted(g):
            problems.append(f"tp group {g}: reports from ranks {ranks}")
        names = [[(c.kind, c.name) for c in r.checks] for r in members]
        if any(n != names[0] for n in names):
            problems.append(f"tp group {g}: ranks checked different things")
            continue
        for i, (kind, name) in enumerate(names[0]):
            digests = {r.rank: r.checks[i].digest for r in members}
            if len(set(digests.values())) > 1:
                problems.append(f"tp group {g}: {kind} {name} is replicated but differs "
                                f"across its ranks (identical copies are due)")
    return problems


def assert_match(reports: Sequence[Report], context: str = "") -> None:
    """Raise :class:`NumericsMismatch` listing every problem :func:`verdict` finds."""
    problems = verdict(reports)
    if problems:
        shown = problems[:40] + [f"... and {len(problems) - 40} more"] * (len(problems) > 40)
        head = f"{context}: " if context else ""
        raise NumericsMismatch(head + f"{len(problems)} problem(s)\n  " + "\n  ".join(shown))


def gather(report: Report, group: Any = None) -> list[Report]:
    """Every rank's report, on every rank (``all_gather_object``; under torchrun)."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, report, group=group)
    return out


def align_grads(module: torch.nn.Module) -> int:
    """Give every DTensor gradient its parameter's placements, as a DTensor optimizer step
    does before it updates (a ``Partial`` gradient reduced, a ``Replicate`` one sliced to
    the parameter's shard); returns how many needed it. For third-party programs:
    PyTorch's ``parallelize_module`` leaves sequence-parallel norms' gradients
    ``Partial`` and a vocab-parallel embedding's ``Replicate``. tpcompile's own modules
    must never need this: :func:`compare` fails a gradient placed otherwise than its
    parameter."""
    n = 0
    for p in module.parameters():
        g = p.grad
        if isinstance(p, DTensor) and isinstance(g, DTensor) and \
                tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)
            n += 1
    return n
