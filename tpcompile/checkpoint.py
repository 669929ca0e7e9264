"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

Each rank writes only its shards; the files load back into any layout (another mesh,
or one process without parallelism), because DCP records every shard's place in the
full tensor. A checkpoint is a folder ``<root>/step-000100`` holding::

    {"model": model state_dict, "optim": optimizer state_dict, "meta": {"step": 100}}

Model and optimizer state come from ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``), which know FSDP2 and DTensor parameters, so
the keys are the user's parameter names (``layers.0.attention.wq.weight``).

Offline conversion (no processes, no GPUs)::

    python -m tpcompile.checkpoint to-torch   CKPT_DIR  model.pt   # unsharded state_dict
    python -m tpcompile.checkpoint from-torch model.pt  CKPT_DIR   # and back
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .errors import TPCompileError, warn

_STEP = re.compile(r"^step-(\d+)$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save(root: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         step: int) -> Path:
    """Save model (+ optimizer) state as of ``step`` (collective: every rank calls it).

    The shards go to a hidden ``.step-NNNNNN.partial`` folder first; only once every
    rank's files and DCP's metadata are written does rank 0 rename it to
    ``step-NNNNNN`` (replacing an older save of the same step). A save cut short, by a
    killed worker say, so never leaves a folder that ``latest`` would pick, and never
    mixes new shards into an old complete checkpoint."""
    final = step_dir(root, step)
    partial = final.with_name(f".{final.name}.partial")
    lead = not dist.is_initialized() or dist.get_rank() == 0
    if lead and partial.exists():
        shutil.rmtree(partial)  # left by a save that was cut short
    _barrier()
    model_sd, optim_sd = get_state_dict(model, [optimizer] if optimizer else [])
    state = {"model": model_sd, "meta": {"step": step}}
    if optimizer is not None:
        state["optim"] = optim_sd
    dcp.save(state, checkpoint_id=partial)  # returns once the metadata is written
    if lead:
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old)
        else:
            partial.rename(final)
    _barrier()
    return final


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointError(TPCompileError):
    """A checkpoint folder or file that cannot be read or written as asked."""


def complete(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint whose metadata reads back (DCP writes the
    metadata last, so a save cut short, or a truncated file, does not count)."""
    if not (Path(path) / ".metadata").is_file():
        return False
    try:
        dcp.FileSystemReader(str(path)).read_metadata()
    except Exception:  # noqa: BLE001 - any unreadable metadata means incomplete
        return False
    return True


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None. Newer steps that are not
    complete (no metadata, or metadata that does not read back) are skipped with a
    warning."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir()
                    if (m := _STEP.match(p.name)) and p.is_dir()), reverse=True)
    for _, p in steps:
        if complete(p):
            return p
        warn(f"tpcompile.checkpoint: skipping {p}: not a complete checkpoint (its "
             ".metadata is missing or does not read back; the save was cut short?)")
    return None


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         require_optimizer_state: bool = True) -> int:
    """Load a checkpoint into ``model`` (+ ``optimizer``) in place, whatever their
    sharding; returns the step it was saved at (collective). A model-only checkpoint
    (``from-torch`` writes those) with an optimizer given is an error, unless
    ``require_optimizer_state=False``: then the optimizer is left as it is, with a
    warning (fine-tuning from converted weights starts the optimizer fresh)."""
    path = Path(path)
    _check_complete(path)
    if optimizer is not None and "optim" not in _saved_keys(path):
        if require_optimizer_state:
            raise CheckpointError(f"{path} holds no optimizer state (a model-only checkpoint, "
                                  f"e.g. made by from-torch). Load it with optimizer=None, or "
                                  f"require_optimizer_state=False to keep the optimizer fresh.")
        warn(f"tpcompile.checkpoint: {path} holds no optimizer state; the optimizer starts "
             "fresh")
        optimizer = None  # asking for its state dict would initialise it (a step of 0s)
    model_sd, optim_sd = get_state_dict(model, [optimizer] if optimizer else [])
    state: dict = {"model": model_sd, "meta": {"step": -1}}
    if optimizer is not None:
        state["optim"] = optim_sd
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, [optimizer] if optimizer else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    return int(state["meta"]["step"])


def _check_complete(path: Path) -> None:
    if not complete(path):
        raise CheckpointError(f"{path} is not a complete DCP checkpoint (no .metadata file, or "
                              "one that does not read back). Point at a step-NNNNNN folder "
                              "written by tpcompile.checkpoint.save (checkpoint.latest(root) "
                              "finds the newest complete one).")


def _saved_keys(path: Path) -> set[str]:
    """Top-level keys of a checkpoint ("model", "optim", "meta")."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {k.split(".", 1)[0] for k in meta.state_dict_metadata}


def to_torch_save(ckpt: str | Path, out: str | Path, part: str | None = "model") -> Path:
    """A DCP checkpoint -> one ``torch.save`` file of full (unsharded) tensors. With
    ``part="model"`` (default) the file is a plain model ``state_dict``:
    ``model.load_state_dict(torch.load(out))`` works on the unsharded model."""
    _check_complete(Path(ckpt))
    if not Path(out).parent.is_dir():
        raise CheckpointError(f"cannot write {out}: its folder {Path(out).parent} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(ckpt, whole)
        state = torch.load(whole, weights_only=False)
    if part is not None:
        if part not in state:
            raise CheckpointError(f"{ckpt} has no '{part}' entry; it has {sorted(state)}")
        state = state[part]
    torch.save(state, out)
    return Path(out)


def from_torch_save(src: str | Path, ckpt: str | Path, step: int = 0) -> Path:
    """A plain model ``state_dict`` file -> a model-only DCP checkpoint that ``load``
    reads into a parallel model (with ``optimizer=None``). ``ckpt`` must not exist yet
    or be an empty folder: writing over a checkpoint would mix its files with the new
    ones (its optimizer state gone from the metadata, its shards left behind)."""
    ckpt = Path(ckpt)
    if ckpt.exists() and (not ckpt.is_dir() or any(ckpt.iterdir())):
        what = "holds a checkpoint" if complete(ckpt) else "is not an empty folder"
        raise CheckpointError(f"{ckpt} {what}; from-torch writes a new checkpoint. Give a new "
                              f"folder (e.g. {ckpt.parent / (ckpt.name + '-from-torch')}), or "
                              "remove this one first")
    if not Path(src).is_file():
        raise CheckpointError(f"{src} does not exist (from-torch reads a torch.save file of a "
                              "model state_dict)")
    try:
        sd = torch.load(src, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors of many kinds
        raise CheckpointError(f"{src} is not a torch.save file of tensors ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{src} is not a plain state_dict (name -> tensor); save one with "
                              "torch.save(model.state_dict(), path)")
    with tempfile.TemporaryDirectory() as tmp:
        wrapped = Path(tmp) / "wrapped.pt"
        torch.save({"model": sd, "meta": {"step": step}}, wrapped)
        torch_save_to_dcp(wrapped, ckpt)
    return Path(ckpt)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tpcompile.checkpoint",
                                 description="Convert between DCP checkpoints and torch.save files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-torch", help="DCP folder -> unsharded model state_dict file")
    a.add_argument("ckpt")
    a.add_argument("out")
    a.add_argument("--all", action="store_true", help="keep optimizer state and meta too")
    b = sub.add_parser("from-torch", help="model state_dict file -> model-only DCP folder")
    b.add_argument("src")
    b.add_argument("ckpt")
    b.add_argument("--step", type=int, default=0, help="the step recorded in the checkpoint")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "to-torch":
            print(to_torch_save(args.ckpt, args.out, None if args.all else "model"))
        else:
            out = from_torch_save(args.src, args.ckpt, args.step)
            print(out)
            print(f"a model-only checkpoint: load it with checkpoint.load(path, model, None), or "
                  f"with an optimizer and require_optimizer_state=False; the examples resume "
                  f"from it (optimizer fresh) when it is ROOT/{step_dir('', args.step)} and "
                  f"they get --checkpoint-dir ROOT --resume", file=sys.stderr)
    except TPCompileError as e:
        print(f"tpcompile.checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())

__all__ = ["save", "load", "latest", "complete", "step_dir", "to_torch_save",
           "from_torch_save", "CheckpointError"]
