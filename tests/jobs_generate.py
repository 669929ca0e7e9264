"""Greedy generation on the parallel module against the unsharded model (jobs)."""

from __future__ import annotations

import copy

import torch

import tpcompile
from tests import jobs, jobs_hf
from tests.harness import tp_mesh


def greedy(rank: int, name: str, tp: int, prompt_len: int, new: int) -> dict:
    """``new`` greedy tokens after a prompt of ``prompt_len``, planned at (2, 8) with
    sequence parallelism: the tokens of both models, and the variants the root ran."""
    if name == "hf_llama":
        ref, _, kwargs = jobs_hf.build("llama")
        example: dict = {"example_kwargs": {"input_ids": kwargs["input_ids"][:2]}}
        vocab = ref.config.vocab_size
    elif name == "nanogpt":  # blocks that take the hidden states alone
        ref, _, kwargs = jobs_hf.build("nanogpt")
        example = {"example_inputs": (kwargs["idx"][:2],)}
        vocab = ref.config.vocab_size
    else:
        ref, (ids,) = jobs.build(name)
        example = {"example_inputs": (ids,)}
        vocab = ref.args.vocab_size
    ref.eval()
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), **example)
    par.eval()
    prompt = torch.randint(3, vocab, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    want = tpcompile.generate(ref, prompt, new)
    got = tpcompile.generate(par, prompt, new)
    programs = par.__dict__["_tpcompile_runtime"].programs
    return {"want": want.tolist(), "got": got.tolist(),
            "variants": sorted({p.sp for p in programs})}


def programs_made(rank: int, lengths: list[int]) -> list[list[bool]]:
    """The project's Llama planned at length 8 with SP, then called at each length: the sp
    flags of the root's programs after each call (and the logits checked each time)."""
    ref, (ids,) = jobs.build("llama")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_inputs=(ids,))
    out = []
    for n in lengths:
        x = torch.randint(0, ref.args.vocab_size, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert torch.allclose(par(x), ref(x), rtol=1e-4, atol=1e-5), n
        out.append([p.sp for p in par.__dict__["_tpcompile_runtime"].programs])
    return out
