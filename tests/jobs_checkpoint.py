"""Jobs for the checkpoint tests (DCP, on the 2x2 (dp, tp) mesh)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import tpcompile
from tests.harness import full
from tests.jobs_fsdp import llama, mesh2d, my_rows, next_token_loss, tokens
from tpcompile import checkpoint as ckpt


def _trainer(lr: float = 1e-3):
    model = tpcompile.auto_parallelize(llama(), mesh2d())
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def _step(model, opt, step: int) -> float:
    x = my_rows(tokens(100 + step, 512), mesh2d())
    loss = next_token_loss(model, x)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def resume(rank: int, root: str, steps: int = 4, stop: int = 2) -> dict:
    """Losses of an uninterrupted run vs. a run saved at ``stop``, rebuilt, resumed."""
    model, opt = _trainer()
    straight = [_step(model, opt, s) for s in range(steps)]
    model, opt = _trainer()
    first = [_step(model, opt, s) for s in range(stop)]
    ckpt.save(root, model, opt, stop)
    del model, opt
    model, opt = _trainer()  # a fresh process would start here
    found = ckpt.latest(root)
    start = ckpt.load(found, model, opt)
    rest = [_step(model, opt, s) for s in range(start, steps)]
    return {"straight": straight, "resumed": first + rest, "start": start, "found": found.name}


def roundtrip(rank: int, root: str) -> dict:
    """Sharded save -> unsharded state_dict file -> plain model: equal bit for bit; and
    the plain file -> DCP -> a fresh parallel model: equal bit for bit."""
    model, opt = _trainer()
    _step(model, opt, 0)
    path = ckpt.save(root, model, opt, 1)
    fulls = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    out = Path(root) / f"plain-{rank}.pt"
    ckpt.to_torch_save(path, out)
    plain = llama(seed=9)  # other values, overwritten by the load
    missing = plain.load_state_dict(torch.load(out, weights_only=True))
    to_plain = {n: bool(torch.equal(p, fulls[n])) for n, p in plain.named_parameters()}

    back = Path(root) / "from-plain"
    if rank == 0:
        ckpt.from_torch_save(out, back)
    dist.barrier()
    fresh, _ = _trainer()
    ckpt.load(back, fresh, None)
    from_plain = {n: bool(torch.equal(full(p), fulls[n])) for n, p in fresh.named_parameters()}
    try:
        ckpt.load(back, fresh, torch.optim.AdamW(fresh.parameters()))
        no_optim_error = ""
    except tpcompile.TPCompileError as e:
        no_optim_error = str(e)
    return {"to_plain": to_plain, "from_plain": from_plain, "keys": str(missing),
            "no_optim_error": no_optim_error, "plain_type": type(plain.output.weight).__name__}
