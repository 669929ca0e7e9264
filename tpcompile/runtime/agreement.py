"""Ranks that must agree, checked before they can disagree inside a collective.

* **Planning**: ``auto_parallelize`` ends its planning (everything before the first
  change to the model) with one object all-gather over the mesh. A rank that failed
  re-raises its own error; every other rank raises :class:`PlanningFailedElsewhere`
  naming the failed ranks and their errors. Without it the ranks that succeeded would
  wait in their first collective until the process group's timeout.
* **Inputs**: tensor parallelism needs the same inputs on every tp rank. Before the root
  program runs, the tp ranks all-gather a digest of the call (its structure, each
  tensor's shape and dtype, the train/eval mode): one 24-byte all-gather per call. With
  ``TPCOMPILE_CHECK_INPUTS=1`` the digest also holds value checksums of every tensor
  (a debug switch: it reads every input once). ``TPCOMPILE_CHECK_INPUTS=0`` turns the
  check off. A mismatch raises :class:`InputMismatchError` on every tp rank, naming
  what differs, before any collective of the program could hang or abort.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import TPCompileError


class InputMismatchError(TPCompileError):
    """The tp ranks were called with different inputs (shapes, structure or values)."""


class PlanningFailedElsewhere(TPCompileError):
    """``auto_parallelize`` failed on another rank; this rank stops too."""


def _backend(group: dist.ProcessGroup | None) -> str:
    try:
        return str(dist.get_backend(group))
    except Exception:  # noqa: BLE001 - no process group at all
        return ""


def _all_gather_object(obj: Any, group: dist.ProcessGroup) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    with _disable_current_modes():
        dist.all_gather_object(out, obj, group=group)
    return out


def agree_on_planning(mesh: DeviceMesh, error: BaseException | None) -> None:
    """Every rank of ``mesh`` learns whether planning failed anywhere; raise if it did."""
    try:
        groups = [mesh.get_group(d) for d in range(mesh.ndim)]
    except Exception:  # noqa: BLE001 - not a usable mesh: that is the error to report
        groups = []
    if not groups or not dist.is_initialized() or any(_backend(g) == "fake" for g in groups):
        if error is not None:
            raise error
        return
    mine = None if error is None else (dist.get_rank(), type(error).__name__,
                                       str(error).strip().splitlines()[0][:500] if str(error)
                                       else "")
    status: list[Any] = [mine]
    for g in groups:  # gather along each mesh dim in turn: every rank sees every rank
        status = [s for part in _all_gather_object(status, g) for s in part]
    failed = sorted({s for s in status if s is not None})
    if error is not None:
        raise error
    if failed:
        said = "; ".join(f"rank {r}: {kind}: {msg}" for r, kind, msg in failed)
        raise PlanningFailedElsewhere(
            f"auto_parallelize failed on {len(failed)} other rank(s) ({said}). This rank stops "
            "too, so that no rank waits in a collective. Every rank must be given the same "
            "model and example inputs.")


def _mode() -> str:
    return os.environ.get("TPCOMPILE_CHECK_INPUTS", "shapes").strip().lower()


def describe_call(flat: list[Any], spec: pytree.TreeSpec, training: bool) -> list[str]:
    """What must be equal on every tp rank, one readable line per item."""
    out = [f"mode: {'train' if training else 'eval'}", f"structure: {spec}"]
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor):
            out.append(f"input {i}: {list(x.shape)} {str(x.dtype).removeprefix('torch.')}")
        else:
            out.append(f"input {i}: {x!r}"[:200])
    return out


def _checksums(flat: list[Any]) -> tuple[float, float]:
    """Two sums over every tensor's values (the second weighted by position, so a
    permutation shows); equal tensors give bit-equal sums on the same kind of device."""
    s1 = s2 = 0.0
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor) and x.numel():
            v = x.detach().flatten().to(torch.float64)
            w = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.float64)
            s1 += float(v.sum()) * (i + 1)
            s2 += float((v * w).sum())
    return s1, s2


class InputCheck:
    """The per-call input agreement of one root module over its tp group."""

    def __init__(self, group_name: str, device_type: str) -> None:
        self.group_name = group_name
        self.device_type = device_type
        self._pg: dist.ProcessGroup | None = None

    def __deepcopy__(self, memo: dict) -> InputCheck:
        """A copy of a parallel model checks on the same process group: the handle (which
        cannot be copied or pickled) is shared."""
        new = InputCheck(self.group_name, self.device_type)
        new._pg = self._pg
        return new

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pg": None}  # resolved again by name where it lands

    def _group(self) -> dist.ProcessGroup:
        if self._pg is None:  # resolved once, on the first call
            from torch.distributed.distributed_c10d import _resolve_process_group
            self._pg = _resolve_process_group(self.group_name)
        return self._pg

    def __call__(self, flat: list[Any], spec: pytree.TreeSpec, training: bool) -> None:
        mode = _mode()
        if mode in ("0", "off", "false", "no") or torch.compiler.is_compiling():
            return
        group = self._group()
        if dist.get_world_size(group) == 1 or _backend(group) == "fake":
            return
        lines = describe_call(flat, spec, training)
        values = mode in ("1", "values", "on", "true", "yes")
        digest = zlib.crc32("\n".join(lines).encode())
        s1, s2 = _checksums(flat) if values else (0.0, 0.0)
        device = (torch.device(self.device_type, torch.cuda.current_device())
                  if self.device_type == "cuda" else torch.device(self.device_type))
        with _disable_current_modes():
            mine = torch.tensor([float(digest), s1, s2], dtype=torch.float64, device=device)
            c10d = torch.ops._c10d_functional
            everyone = c10d.wait_tensor(c10d.all_gather_into_tensor(
                mine, dist.get_world_size(group), self.group_name))
            rows = everyone.view(-1, 3).tolist()
        if all(r == rows[0] for r in rows):
            return
        ranks = dist.get_process_group_ranks(group)
        seen = _all_gather_object(lines, group)
        first = seen[0]
        diffs = []
        for rank, theirs in zip(ranks[1:], seen[1:]):
            bad = [f"{a!s} vs {b!s}" for a, b in zip(first, theirs) if a != b]
            if len(first) != len(theirs):
                bad.append(f"{len(first) - 2} inputs vs {len(theirs) - 2}")
            if bad:
                diffs.append(f"rank {rank} differs from rank {ranks[0]}: " + "; ".join(bad[:4]))
        if not diffs:
            diffs.append("the shapes agree but the values differ (TPCOMPILE_CHECK_INPUTS=1 "
                         "compares value checksums)")
        raise InputMismatchError(
            "the tensor-parallel ranks were called with different inputs: "
            + " | ".join(diffs) + ". Every tp rank must get the same inputs (give each "
            "data-parallel rank its own data, and every tp rank within it the same).")
