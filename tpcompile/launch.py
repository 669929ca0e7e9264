"""Process-group set-up that survives ``torchrun --max-restarts``.

Since PyTorch 2.5, torchrun's c10d rendezvous shares one TCPStore between the elastic
agent and its workers (``TORCHELASTIC_USE_AGENT_STORE=True``), and that store outlives a
restart. ``dist.init_process_group`` writes each rank's address under the same keys on
every start, so the workers of a restarted group can read the addresses of the dead
ones and fail in ``Gloo connectFullMesh ... Connection refused`` (NCCL reads a stale
unique id the same way; pytorch/pytorch#135712).

``init_distributed`` keys the process group's store by how many times this rank has
started: every rank bumps its own counter in the shared store, and since torchelastic
stops and restarts the whole group on any failure, all ranks of one group read the same
count. Keys of earlier starts stay behind under other prefixes, unread. Outside
torchelastic it is plain ``dist.init_process_group``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .errors import TPCompileError


class LaunchError(TPCompileError):
    """The environment does not describe a distributed launch tpcompile can set up."""


def _agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def init_distributed(backend: str | None = None,
                     timeout: datetime.timedelta | None = None) -> None:
    """Initialise the default process group from torchrun's environment, so that a
    group restarted by ``torchrun --max-restarts=N`` comes up again. The backend is
    NCCL for CUDA tensors and gloo for CPU ones when CUDA is present (the CUDA device is
    set from ``LOCAL_RANK``), gloo otherwise. A second call is a no-op."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend or ("cuda:nccl,cpu:gloo" if cuda else "gloo")
    extra = {} if timeout is None else {"timeout": timeout}
    if not _agent_store():
        dist.init_process_group(backend, **extra)
        return
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except KeyError as e:
        raise LaunchError(f"TORCHELASTIC_USE_AGENT_STORE is set but {e.args[0]} is not: "
                          "start the workers with torchrun") from None
    store = dist.TCPStore(host, port, world_size=world, is_master=False,
                          timeout=timeout or datetime.timedelta(minutes=5))
    start = store.add(f"tpcompile/starts/world{world}/rank{rank}", 1)
    dist.init_process_group(backend, store=dist.PrefixStore(f"tpcompile/start{start}", store),
                            rank=rank, world_size=world, **extra)


def init_mesh(tp: int, dim_names: tuple[str, str] = ("dp", "tp")) -> DeviceMesh:
    """``init_distributed`` and a 2-D ``(WORLD_SIZE // tp, tp)`` mesh named ``dim_names``
    on CUDA when present, CPU otherwise (a 1-D mesh named ``dim_names[1]`` when the
    whole world is one tensor-parallel group)."""
    init_distributed()
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise LaunchError(f"WORLD_SIZE {world} is not a multiple of tp {tp}; pick a tp that "
                          f"divides {world}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == tp:
        return init_device_mesh(device, (tp,), mesh_dim_names=(dim_names[1],))
    return init_device_mesh(device, (world // tp, tp), mesh_dim_names=dim_names)


__all__ = ["init_distributed", "init_mesh", "LaunchError"]
