"""Hugging Face folders in and out of the parallel model (jobs; the folders are written by
transformers in the parent)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor

import tpcompile
from tests.harness import mesh, raised, tp_mesh
from tpcompile.verify import full


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = full(a).detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def load_step_save(rank: int, folder: str, out: str, tp: int, dp: int,
                   max_shard_bytes: int = 5 * 2**30) -> dict:
    """from_pretrained on tp (or dp x tp), logits against transformers' own load, one SGD
    step on both, save_pretrained, and the saved weights against the reference's."""
    from transformers import AutoModelForCausalLM
    target = mesh((dp, tp), ("dp", "tp")) if dp > 1 else tp_mesh(tp)
    par = tpcompile.from_pretrained(folder, target)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref.config.use_cache = False
    ref.train()
    # optimizers before the first forward: FSDP2 registers the root's unsharded parameters
    # during forward, and an optimizer made then would hold those
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_par = torch.optim.SGD(par.parameters(), lr=0.5)
    ids = torch.randint(3, ref.config.vocab_size, (2 * dp, 8), generator=torch.Generator().manual_seed(3))
    rows = ids.chunk(dp)[target["dp"].get_local_rank()] if dp > 1 else ids
    logits = _rel(par(input_ids=rows).logits, ref(input_ids=ids).logits.chunk(dp)[
        target["dp"].get_local_rank() if dp > 1 else 0])
    ref(input_ids=ids, labels=ids).loss.backward()
    par(input_ids=rows, labels=rows).loss.backward()
    grads = {n: _rel(q.grad, dict(ref.named_parameters())[n].grad) for n, q in par.named_parameters()}
    opt_ref.step()
    opt_par.step()
    pushed = raised(lambda: par.save_pretrained(out, push_to_hub=True))
    if dp == 1:  # transformers' own method on the parallel model (it failed in safetensors
        par.save_pretrained(out, max_shard_size=max_shard_bytes)  # after writing config.json)
    else:
        tpcompile.save_pretrained(par, out, max_shard_bytes=max_shard_bytes)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = dict(ref.named_parameters())
    weights = {n: _rel(p, want[n]) for n, p in saved.named_parameters()}
    again = tpcompile.from_pretrained(out, target)  # our own reader, sharded index included
    weights.update({f"reloaded {n}": _rel(p, want[n]) for n, p in again.named_parameters()})
    sharded = sum(p.to_local().numel() * p.element_size() for p in par.parameters()
                  if isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements))
    total = sum(p.numel() * p.element_size() for p in ref.parameters())
    return {"grads": grads, "logits": logits, "weights": weights, "read": par.tpcompile_read_bytes,
            "total": total, "sharded_local": sharded, "pushed": pushed}


def refused(rank: int, folder: str) -> dict:
    try:
        tpcompile.from_pretrained(folder, tp_mesh(2))
    except tpcompile.TPCompileError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


def loaded_exactly(rank: int, folder: str) -> dict:
    """from_pretrained at tp 2 of a folder saved in bf16: every parameter's dtype and
    its full tensor against the file's, bit for bit; and the forward runs in bf16."""
    from safetensors.torch import load_file
    disk = load_file(f"{folder}/model.safetensors")
    par = tpcompile.from_pretrained(folder, tp_mesh(2))
    dtypes = {str(p.dtype) for p in par.parameters()}
    unequal = [n for n, p in par.named_parameters() if not torch.equal(full(p), disk[n])]
    logits = par(input_ids=torch.arange(3, 11).view(1, 8)).logits
    return {"dtypes": sorted(dtypes), "unequal": unequal, "compared": len(disk),
            "logits": str(logits.dtype)}


def loads_with_warnings(rank: int, folder: str) -> list[str]:
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpcompile.from_pretrained(folder, tp_mesh(2))
    return [str(w.message) for w in caught if "from_pretrained" in str(w.message)]


def read_per_part(rank: int, folder: str) -> dict:
    """from_pretrained at tp 2: bytes read per parameter (the reader wrapped), and every
    parameter's full tensor against transformers' own load of the folder."""
    from transformers import AutoModelForCausalLM

    from tpcompile import hf
    read: dict[str, int] = {}
    fill = hf._Reader.fill

    def counted(self: Any, name: str, p: torch.Tensor) -> None:
        before = self.read_bytes
        fill(self, name, p)
        read[name] = self.read_bytes - before
    hf._Reader.fill = counted  # type: ignore[method-assign]
    try:
        par = tpcompile.from_pretrained(folder, tp_mesh(2))
    finally:
        hf._Reader.fill = fill  # type: ignore[method-assign]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want = dict(ref.named_parameters())
    return {"read": read, "bytes": {n: p.numel() * p.element_size() for n, p in want.items()},
            "unequal": [n for n, p in par.named_parameters() if not torch.equal(full(p), want[n])],
            "placements": {n: str(p.placements) for n, p in par.named_parameters()}}


class _Wrapped(torch.nn.Module):
    """A training wrapper around a transformers model (what a user's own loop holds)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def wrapped_save(rank: int, out: str) -> dict:
    """transformers' own save_pretrained on the model inside a parallel wrapper writes the
    folder transformers loads (rank 0 failed in safetensors on the DTensors)."""
    from transformers import AutoModelForCausalLM

    from models import hf_zoo
    torch.manual_seed(0)
    ref = hf_zoo.build("llama")
    par = tpcompile.auto_parallelize(_Wrapped(copy.deepcopy(ref)), tp_mesh(2),
                                     example_inputs=(torch.randint(0, 128, (2, 8)),))
    par.lm.save_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = dict(ref.named_parameters())
    return {n: _rel(p, want[n]) for n, p in saved.named_parameters()}
