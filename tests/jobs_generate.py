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


def with_use_cache(rank: int) -> dict:
    """An HF Llama whose config has use_cache=True, as from_pretrained loads one: planned
    without a KV cache (and said so); trained a step against the unsharded model (its loss,
    logits and every gradient); then transformers' own ``generate``: with its default
    use_cache=True refused by name, with use_cache=False the unsharded model's tokens."""
    import warnings
    ref, _, kwargs = jobs_hf.build("llama", use_cache=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), example_kwargs=kwargs)
    said = [str(w.message) for w in caught if "use_cache" in str(w.message)]
    o_ref, o_par = ref(**kwargs), par(**kwargs)
    o_ref.loss.backward()
    o_par.loss.backward()
    verdict = jobs_hf.judge(ref, par, (o_ref.loss, o_ref.logits), (o_par.loss, o_par.logits))
    cache = (type(o_ref.past_key_values).__name__, o_par.past_key_values)
    ref.eval()
    par.eval()
    ids, mask = kwargs["input_ids"][:2], kwargs["attention_mask"][:2]
    options = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    try:
        par.generate(ids, **options)
        refused = ""
    except tpcompile.TPCompileError as e:
        refused = f"{type(e).__name__}: {e}"
    want = ref.generate(ids, **options).tolist()
    got = par.generate(ids, use_cache=False, **options).tolist()
    # use_cache=None given (transformers' own default argument): the config decides, so
    # the same as not given
    ref.train()
    none = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2),
                                      example_kwargs={**kwargs, "use_cache": None})
    o_none = none(**kwargs, use_cache=None)
    none_err = float((o_none.logits - ref(**kwargs).logits).abs().max())
    return {"said": said, "verdict": verdict, "cache": cache, "refused": refused,
            "want": want, "got": got, "none_err": none_err,
            "none_cache": o_none.past_key_values}
