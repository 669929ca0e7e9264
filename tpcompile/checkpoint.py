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
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .errors import TPCompileError

_STEP = re.compile(r"^step-(\d+)$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save(root: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         step: int) -> Path:
    """Save model (+ optimizer) state as of ``step`` (collective: every rank calls it)."""
    path = step_dir(root, step)
    model_sd, optim_sd = get_state_dict(model, [optimizer] if optimizer else [])
    state = {"model": model_sd, "meta": {"step": step}}
    if optimizer is not None:
        state["optim"] = optim_sd
    dcp.save(state, checkpoint_id=path)
    return path


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (one whose metadata was written: DCP
    writes it last, so a save cut short is skipped), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _STEP.match(p.name)) and (p / ".metadata").is_file()]
    return max(done)[1] if done else None


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Load a checkpoint into ``model`` (+ ``optimizer``) in place, whatever their
    sharding; returns the step it was saved at (collective)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise TPCompileError(f"{path} is not a complete DCP checkpoint (no .metadata file). "
                             f"Point at a step-NNNNNN folder written by tpcompile.checkpoint.save.")
    model_sd, optim_sd = get_state_dict(model, [optimizer] if optimizer else [])
    state: dict = {"model": model_sd, "meta": {"step": -1}}
    keys = _saved_keys(path)
    if optimizer is not None:
        if "optim" not in keys:
            raise TPCompileError(f"{path} holds no optimizer state (a model-only checkpoint, "
                                 f"e.g. made by from-torch). Load it with optimizer=None.")
        state["optim"] = optim_sd
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, [optimizer] if optimizer else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    return int(state["meta"]["step"])


def _saved_keys(path: Path) -> set[str]:
    """Top-level keys of a checkpoint ("model", "optim", "meta")."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {k.split(".", 1)[0] for k in meta.state_dict_metadata}


def to_torch_save(ckpt: str | Path, out: str | Path, part: str | None = "model") -> Path:
    """A DCP checkpoint -> one ``torch.save`` file of full (unsharded) tensors. With
    ``part="model"`` (default) the file is a plain model ``state_dict``:
    ``model.load_state_dict(torch.load(out))`` works on the unsharded model."""
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(ckpt, whole)
        state = torch.load(whole, weights_only=False)
    if part is not None:
        if part not in state:
            raise TPCompileError(f"{ckpt} has no '{part}' entry; it has {sorted(state)}")
        state = state[part]
    torch.save(state, out)
    return Path(out)


def from_torch_save(src: str | Path, ckpt: str | Path, step: int = 0) -> Path:
    """A plain model ``state_dict`` file -> a model-only DCP checkpoint that ``load``
    reads into a parallel model (with ``optimizer=None``)."""
    sd = torch.load(src, weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TPCompileError(f"{src} is not a plain state_dict (name -> tensor)")
    with tempfile.TemporaryDirectory() as tmp:
        wrapped = Path(tmp) / "wrapped.pt"
        torch.save({"model": sd, "meta": {"step": step}}, wrapped)
        torch_save_to_dcp(wrapped, ckpt)
    return Path(ckpt)


def _main(argv: list[str] | None = None) -> None:
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
    args = ap.parse_args(argv)
    if args.cmd == "to-torch":
        print(to_torch_save(args.ckpt, args.out, None if args.all else "model"))
    else:
        print(from_torch_save(args.src, args.ckpt))


if __name__ == "__main__":
    _main()

__all__ = ["save", "load", "latest", "step_dir", "to_torch_save", "from_torch_save"]
