"""Hugging Face checkpoints in and out: ``tpcompile.from_pretrained`` and
``tpcompile.save_pretrained``.

``from_pretrained(folder, mesh)`` builds the model from ``config.json`` with its
parameters on the meta device (buffers such as rotary tables are computed for real: they
are small and not in the checkpoint), plans it, and fills each rank's shards straight
from the ``*.safetensors`` files with ``safe_open(...).get_slice``: a rank reads the
rows (or columns) it holds and nothing else, so a checkpoint never exists whole in one
process. A fused projection's per-part slices are read part by part. A parameter whose
placement is neither (FSDP's strided dp shard on top of tp) is read whole and sharded
locally; that is counted in ``read_bytes`` too.

Checkpoints of transformers 5's MoE families store one Linear per expert (Mixtral's
``block_sparse_moe.experts.N.w1``), which transformers renames and stacks into one 3-D
Parameter per projection as it loads them. tpcompile follows the same conversion mapping
(transformers' own) for renames and for stacking along the experts (and concatenating
gate and up): each rank reads its rows or columns of every expert's tensor. Any other
conversion is not followed: the parameter is named as missing.

``save_pretrained(model, folder)`` gathers one parameter at a time (every rank takes
part), and rank 0 writes ``config.json`` and safetensors under the original names, a file
each time ``max_shard_bytes`` have gathered (transformers' index when there are several,
so rank 0 never holds more than one file's worth), into a temporary folder renamed into
place at the end, so a crash never leaves a folder that looks complete.
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it unchanged.

``transformers`` and ``safetensors`` are imported inside the functions (the ``hf`` extra).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .api import ON_COMMIT, auto_parallelize, split_mesh
from .errors import TPCompileError, warn
from .planning.calls import is_transformers


class CheckpointFolderError(TPCompileError):
    """A Hugging Face folder that cannot give this model its weights."""


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters registered in this block land on the meta device; buffers stay real."""
    real = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        real(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = real  # type: ignore[method-assign]


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / f for name, f in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.exists()})
        if missing:
            raise CheckpointFolderError(
                f"{index} names shard file(s) that are not in the folder: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if not single.exists():
        raise CheckpointFolderError(
            f"{folder} holds neither model.safetensors nor model.safetensors.index.json; "
            "save the model with transformers' save_pretrained (safetensors is its default)")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    """safe_open, a file that is not safetensors (truncated, say) refused by name."""
    from safetensors import safe_open
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointFolderError(f"{path} is not a readable safetensors file "
                                    f"({type(e).__name__}: {e}); a copy cut short?") from None


def _block(p: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(local shape, global offset) when this rank's shard is one block of the global
    tensor (Shard and Replicate placements only), else None."""
    if not all(type(pl) in (Shard, Replicate) for pl in p.placements):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)


def _stored_layout(model_type: str | None, stored: list[str], names: set[str]
                   ) -> tuple[dict[str, str], dict[str, list[list[str]]], list[str]]:
    """How transformers 5 reads a checkpoint of ``model_type`` into its model, as far as
    tpcompile follows it: (model name -> stored name) for tensors stored under a model
    name (``names``) or one transformers' renamings give, (model name -> stored names per
    source, in expert order) for a 3-D Parameter of experts that transformers merges from
    one Linear per expert (Mixtral's ``experts.N.w1`` and ``w3`` into
    ``experts.gate_up_proj``), and the stored names of any other conversion, not followed
    (their parameter is named as missing). The matching is transformers' own
    (``rename_source_key`` over its checkpoint conversion mapping)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import (Concatenate, MergeModulelist,
                                                     WeightConverter, WeightRenaming,
                                                     rename_source_key)
    except ImportError:  # an older transformers: names as stored
        return {n: n for n in stored}, {}, []
    mapping = (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    direct: dict[str, str] = {}
    merged: dict[str, dict[int, dict[int, str]]] = {}
    sources: dict[str, list[str]] = {}
    dropped: list[str] = []
    for key in stored:
        if key in names:
            direct[key] = key
            continue
        new, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            direct[new] = key
            continue
        t = next(c for c in converters if pattern in c.source_patterns)
        ops = [(type(o), getattr(o, "dim", None)) for o in t.operations]
        stack = ops[:1] == [(MergeModulelist, 0)] and ops[1:] in ([], [(Concatenate, 1)])
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        if stack and expert and (len(t.source_patterns) == 1 or len(ops) == 2):
            part = t.source_patterns.index(pattern)
            merged.setdefault(new, {}).setdefault(part, {})[int(expert.group(1))] = key
            sources.setdefault(new, []).append(key)
        else:
            dropped.append(key)
    whole = {}
    for target, parts in merged.items():  # every part, every expert 0..E-1
        n = len(next(iter(parts.values())))
        if sorted(parts) == list(range(len(parts))) and \
                all(sorted(p) == list(range(n)) for p in parts.values()):
            whole[target] = [[parts[i][e] for e in range(n)] for i in range(len(parts))]
        else:
            dropped += sources[target]
    return direct, whole, sorted(dropped)


def _indices(p: torch.Tensor) -> list[list[int]] | None:
    """The global indices, per dim, of this rank's shard of ``p`` (a tensor on a 1-D
    mesh, sharded on one dim, in one block or in a block of each of equal parts: a fused
    projection's), or None (anything else: FSDP's placements on a 2-D mesh)."""
    if not isinstance(p, DTensor):
        return [list(range(s)) for s in p.shape]
    from torch.distributed.tensor.placement_types import _StridedShard
    mesh, (pl,) = p.device_mesh, (p.placements if p.device_mesh.ndim == 1 else (None,))
    out = [list(range(s)) for s in p.shape]
    if isinstance(pl, Replicate):
        return out
    if not isinstance(pl, (Shard, _StridedShard)) or p.shape[pl.dim] % (mesh.size() * (
            pl.split_factor if isinstance(pl, _StridedShard) else 1)):
        return None
    n, r = mesh.size(), mesh.get_local_rank()
    parts = pl.split_factor if isinstance(pl, _StridedShard) else 1
    size = p.shape[pl.dim] // parts
    out[pl.dim] = [j * size + i for j in range(parts)
                   for i in range(r * size // n, (r + 1) * size // n)]
    return out


def _runs(idx: list[int]) -> list[slice]:
    """Consecutive runs of sorted indices, as slices."""
    out: list[slice] = []
    for i in idx:
        if out and out[-1].stop == i:
            out[-1] = slice(out[-1].start, i + 1)
        else:
            out.append(slice(i, i + 1))
    return out


class _Reader:
    """Reads this rank's part of each tensor from the safetensors files, counting bytes.
    ``files``: stored name -> file; ``model_type``: the config's, for transformers'
    renaming and merging of per-expert tensors (see ``_stored_layout``); ``names``: the
    model's parameter (tied: every name) and buffer names."""

    def __init__(self, files: dict[str, Path], model_type: str | None, names: set[str]) -> None:
        self.names = names
        self.stored, self.merged, self.dropped = _stored_layout(model_type, list(files), names)
        self.files = {name: files[key] for name, key in self.stored.items()}
        self.sources = {key: files[key] for parts in self.merged.values() for part in parts
                        for key in part}
        self.handles = {f: _open(f) for f in sorted(set(files.values()))}
        self.read_bytes = 0

    def _slice(self, name: str) -> Any:
        """The stored tensor under a model name, or a merged one's source by its key."""
        if name in self.files:
            return self.handles[self.files[name]].get_slice(self.stored[name])
        return self.handles[self.sources[name]].get_slice(name)

    def has(self, name: str) -> bool:
        return name in self.files or name in self.merged

    def where(self, name: str) -> str:
        return self.files[name].name if name in self.files else \
            self.sources[self.merged[name][0][0]].name

    def shape(self, name: str) -> list[int]:
        if name in self.files:
            return list(self._slice(name).get_shape())
        parts = self.merged[name]  # [E, rows of every part, cols]
        first = [list(self._slice(part[0]).get_shape()) for part in parts]
        return [len(parts[0]), sum(s[0] for s in first), *first[0][1:]]

    @torch.no_grad()
    def fill(self, name: str, p: torch.Tensor) -> None:
        from .runtime.distribute import copy_full_into
        if name in self.merged:
            return self._fill_merged(name, p)
        piece = self._slice(name)
        block = _block(p) if isinstance(p, DTensor) else (tuple(p.shape), (0,) * p.dim())
        idx = _indices(p) if block is None else None
        if idx is not None:  # a block of each part (a fused projection's): part by part
            runs = [_runs(i) for i in idx]
            d = max(range(len(runs)), key=lambda k: len(runs[k]))
            value = torch.cat([piece[tuple(r if k == d else rs[0] for k, rs in enumerate(runs))]
                               for r in runs[d]], dim=d)
            self.read_bytes += value.numel() * value.element_size()
            p.to_local().copy_(value.to(p.dtype))  # type: ignore[union-attr]
            return
        if block is None:  # not one block per rank: read whole, keep this rank's shard
            full = piece[:]
            self.read_bytes += full.numel() * full.element_size()
            copy_full_into(p, full)
            return
        shape, offset = block
        value = piece[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        self.read_bytes += value.numel() * value.element_size()
        local = p.to_local() if isinstance(p, DTensor) else p
        local.copy_(value.to(local.dtype))

    def _fill_merged(self, name: str, p: torch.Tensor) -> None:
        """A Parameter of experts from one stored tensor per expert and part: this rank's
        experts, rows and columns of each, read as slices (whole, then sharded here, for
        placements that are not per dim, FSDP's on a 2-D mesh)."""
        from .runtime.distribute import copy_full_into
        parts = self.merged[name]
        rows = [int(self._slice(part[0]).get_shape()[0]) for part in parts]
        idx = _indices(p)
        if idx is None:
            idx = [list(range(s)) for s in p.shape]
        experts, want, cols = idx
        col_runs = _runs(cols)
        blocks = []
        for e in experts:
            pieces, start = [], 0
            for part, n in zip(parts, rows):
                mine = [i - start for i in want if start <= i < start + n]
                start += n
                src = self._slice(part[e])
                for r in _runs(mine):
                    pieces.append(torch.cat([src[r, c] for c in col_runs], dim=1))
            blocks.append(torch.cat(pieces, dim=0))
        value = torch.stack(blocks)
        self.read_bytes += value.numel() * value.element_size()
        if list(value.shape) == list(p.shape) and isinstance(p, DTensor):  # read whole
            copy_full_into(p, value)
            return
        local = p.to_local() if isinstance(p, DTensor) else p
        local.copy_(value.to(local.dtype))


def _check_names(model: nn.Module, reader: _Reader, folder: Path) -> None:
    """Every parameter of the model is in the checkpoint with the same shape; tensors the
    model does not have are named in a warning."""
    problems, found = [], 0
    names = dict(model.named_parameters())  # tied parameters once, under their first name
    for name, p in names.items():
        if not reader.has(name):
            problems.append(f"{name} is missing")
            continue
        found += 1
        if reader.shape(name) != list(p.shape):
            problems.append(f"{name} is {reader.shape(name)} in {reader.where(name)}, "
                            f"{list(p.shape)} in the model")
    kind = type(model).__name__
    if not found:
        held = ", ".join(sorted(reader.files)[:3])
        raise CheckpointFolderError(
            f"none of {kind}'s tensors (from {folder / 'config.json'}) are in the safetensors "
            f"files of {folder}, which hold {held}, ...: a checkpoint of another model, or a "
            "config.json that does not belong to these files?")
    if problems:
        raise CheckpointFolderError(
            f"{folder} does not fit the model its config.json builds ({kind}): "
            f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}")
    extra = sorted([reader.stored[n] for n in reader.files if n not in reader.names] +
                   reader.dropped)
    if extra:
        warn(f"tpcompile.from_pretrained: {len(extra)} tensor(s) in {folder} that {kind} does "
             f"not have are not loaded: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")


def from_pretrained(folder: str | os.PathLike, mesh: DeviceMesh, *,
                    example_kwargs: dict | None = None, dtype: torch.dtype | None = None,
                    **kwargs: Any) -> nn.Module:
    """A Hugging Face causal LM folder (``config.json`` + safetensors) -> the parallel
    model on ``mesh`` (1-D tp, or 2-D ("dp", "tp") with FSDP2), each rank reading only
    its shards. ``dtype``: the parameters' dtype (default: the config's ``torch_dtype``,
    else float32). ``kwargs`` go to :func:`auto_parallelize`. The number of bytes this
    rank read is in ``model.tpcompile_read_bytes``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointFolderError(f"{folder} has no config.json; pass the folder "
                                    "transformers' save_pretrained wrote")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    config.use_cache = False
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) \
        or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    reader = _Reader(_tensor_files(folder), getattr(config, "model_type", None),
                     {n for n, _ in [*model.named_parameters(remove_duplicate=False),
                                     *model.named_buffers()]})  # tied: both names
    _check_names(model, reader, folder)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    for m in model.modules():  # everything on meta now; the init puts it back
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = b.to("meta")

    def init(m: nn.Module) -> None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                reader.fill(name, p)
            for name, b in m.named_buffers():
                b.copy_(buffers[name])

    tp = split_mesh(mesh)[0].size()
    if example_kwargs is None:
        example_kwargs = {"input_ids": torch.zeros(2, 2 * max(tp, 2), dtype=torch.long,
                                                   device="meta")}
    par = auto_parallelize(model, mesh, example_kwargs=example_kwargs, init_fn=init, **kwargs)
    par.__dict__["tpcompile_read_bytes"] = reader.read_bytes
    return par


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter (a tied one once) and persistent buffer."""
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:  # a tied weight is stored once, as transformers does
            seen.add(id(p))
            yield name, p
    for name, b in model.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            yield name, b


class _ShardWriter:
    """Rank 0's side of save_pretrained: full tensors in, a safetensors file written each
    time ``limit`` bytes have gathered (so rank 0 holds at most one file's worth), and
    transformers' names at the end (``model.safetensors``, or ``model-0000i-of-0000n``
    with ``model.safetensors.index.json``)."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.files: list[list[str]] = []  # tensor names per file, in order

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self.flush()
        self.pending[name] = t
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file
        if self.pending:
            save_file(self.pending, str(self.folder / f"part-{len(self.files)}.safetensors"),
                      metadata={"format": "pt"})
            self.files.append(list(self.pending))
            self.pending, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            (self.folder / "part-0.safetensors").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"part-{i}.safetensors").rename(self.folder / final)
            weight_map.update((name, final) for name in names)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def route_save_pretrained(model: nn.Module) -> None:
    """A transformers model's own ``save_pretrained`` would hand safetensors the DTensor
    parameters (it gathers only what transformers parallelized itself), failing after it
    wrote ``config.json``. On a parallel model the method is this module's
    ``save_pretrained``: the same folder, written from the gathered parameters."""
    for m in model.modules():  # a transformers model inside a wrapper too (not a PEFT
        # model around one: its save_pretrained writes the adapter alone)
        if is_transformers(m, "PreTrainedModel"):
            _route(m)


def _route(model: nn.Module) -> None:
    def routed(self: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
               state_dict: dict | None = None, push_to_hub: bool = False,
               max_shard_size: int | str = 5 * 2**30, **kwargs: Any) -> None:
        """transformers' ``save_pretrained`` on a tpcompile model: every rank calls it
        (parameters are gathered one at a time; rank 0 writes; a call on rank 0 alone
        waits for the others). Files of at most ``max_shard_size`` (tpcompile's 5 GiB:
        rank 0 holds one file's worth)."""
        refused = {"state_dict": state_dict is not None, "push_to_hub": bool(push_to_hub),
                   "variant": kwargs.pop("variant", None) is not None,
                   "distributed_checkpoint": bool(kwargs.pop("distributed_checkpoint", False)),
                   "safe_serialization": kwargs.pop("safe_serialization", True) is False}
        # nothing to do for these: the folder holds the parameters under transformers 5's
        # own names (an MoE's experts stacked, as transformers 5 and tpcompile load them),
        # whatever save_original_format says
        for k in ("token", "save_peft_format", "save_original_format"):
            kwargs.pop(k, None)
        asked = [k for k, v in refused.items() if v] + sorted(kwargs)
        if asked:
            raise TPCompileError(
                f"save_pretrained({', '.join(f'{k}=...' for k in asked)}) on a tensor-parallel "
                "model: tpcompile writes a plain safetensors folder of the full parameters "
                "from every rank's shards, without those options. Call "
                "model.save_pretrained(folder) on every rank (or tpcompile.save_pretrained("
                "model, folder)), then push or convert the folder with transformers")
        from transformers.utils.hub import convert_file_size_to_int
        save_pretrained(self, save_directory, max_shard_bytes=convert_file_size_to_int(max_shard_size))

    model.save_pretrained = routed.__get__(model)  # type: ignore[method-assign]


ON_COMMIT.append(route_save_pretrained)


def save_pretrained(model: nn.Module, folder: str | os.PathLike,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a parallel (or plain) HF model as a folder ``transformers`` loads unchanged:
    ``config.json`` and safetensors under the original names, split into files of at most
    ``max_shard_bytes`` (with transformers' index) when bigger. Every rank must call it:
    parameters are gathered one at a time, and rank 0 writes each file as soon as it is
    full, into a temporary folder renamed into place when complete."""
    from torch.distributed.fsdp import FSDPModule

    folder = Path(folder)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for m in model.modules():  # FSDP2 keeps the root unsharded after forward: the
        if isinstance(m, FSDPModule):  # registered parameters would be the stale copies
            m.reshard()
    tmp = folder.with_name(folder.name + ".tmp-tpcompile")
    writer = None
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and getattr(model, "can_generate", lambda: False)():
            generation.save_pretrained(tmp)
        writer = _ShardWriter(tmp, max_shard_bytes)
    for name, t in _tensors(model):
        full = t.full_tensor() if isinstance(t, DTensor) else t  # every rank takes part
        if writer is not None:
            writer.add(name, full.detach().to("cpu").contiguous())
    if writer is not None:
        writer.finish()
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    if dist.is_initialized():
        dist.barrier()
    return folder
