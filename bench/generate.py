"""Greedy generation tokens/s: tpcompile's parallel module against the unsharded model,
alternating in the same process, with the tokens compared.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/generate.py [--prompt 64] [--new 32]

No KV cache (tpcompile.generate runs the whole sequence at each step), so both runs pay
a full forward per token; the first parallel run also pays the traces of the programs
for other lengths (reported separately as "warm-up s").
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tpcompile  # noqa: E402
from bench.common import build_model, emit, init, machine, median, parser, sync  # noqa: E402


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    mesh, device = init()
    rows = []
    for sp in (False, True):
        ref = build_model(args.layers, args.vocab, device, args.seed).eval()
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), mesh, sequence_parallel=sp,
                                         example_inputs=(torch.zeros(1, args.prompt,
                                                                     dtype=torch.long,
                                                                     device=device),))
        par.eval()
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g).to(device)
        warm, _ = timed(lambda: tpcompile.generate(par, prompt, args.new), device)
        t_ref, t_par = [], []
        same = True
        for _ in range(args.repeats):
            a, want = timed(lambda: tpcompile.generate(ref, prompt, args.new), device)
            b, got = timed(lambda: tpcompile.generate(par, prompt, args.new), device)
            t_ref.append(a)
            t_par.append(b)
            same &= bool(torch.equal(want, got))
        rows.append({"sp": "on" if sp else "off", "prompt": args.prompt, "new": args.new,
                     "ref_tok_s": args.new / median(t_ref), "tpc_tok_s": args.new / median(t_par),
                     "ratio": median(t_ref) / median(t_par), "warmup_s": warm,
                     "same_tokens": "yes" if same else "NO"})
    emit({**machine(), "layers": args.layers, "vocab": args.vocab}, rows,
         [("sp", "SP", ""), ("prompt", "prompt", ""), ("new", "new tokens", ""),
          ("ref_tok_s", "unsharded tok/s", ".1f"), ("tpc_tok_s", "tpcompile tok/s", ".1f"),
          ("ratio", "tpcompile/unsharded speed", ".2f"), ("warmup_s", "first run s", ".2f"),
          ("same_tokens", "same tokens", "")], args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
