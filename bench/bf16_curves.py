"""bf16 training curves: the parallel model against the unsharded one, 50 steps.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/bf16_curves.py [--steps 50] [--json]

Three runs of the tutorial Llama (dim 256, 2 layers, 16 heads) from the same weights on
the same batches (a fixed pattern a model can learn, so the loss falls): fp32 unsharded,
bf16 unsharded, and bf16 with tpcompile on the tp mesh (sequence parallel on). bf16 here
means bf16 parameters, activations and AdamW state. The noise scale is how far bf16 is
from fp32 anyway: the table prints, every 5 steps, the three losses, |tp - bf16| and
|bf16 - fp32|, and the summary the largest of each over all steps.
"""

from __future__ import annotations

import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tpcompile  # noqa: E402
from bench import common as C  # noqa: E402


def batches(steps: int, batch: int, seq: int, vocab: int, device: torch.device) -> list:
    """Token ids counting up (mod a few hundred) from a random start per row: learnable."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        start = torch.randint(0, 300, (batch, 1), generator=g)
        ids = (start + torch.arange(seq + 1)) % 300
        out.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))
    return out


def train(model, data) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for tokens, targets in data:
        opt.zero_grad(set_to_none=True)
        loss = C.loss_of(model(tokens).float(), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args()
    mesh, device = C.init()
    ref = C.build_model(args.layers, args.vocab, device, args.seed)
    data = batches(args.steps, args.batch, args.seq, args.vocab, device)
    fp32 = train(copy.deepcopy(ref), data)
    bf16 = train(copy.deepcopy(ref).to(torch.bfloat16), data)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref).to(torch.bfloat16), mesh)
    tp = train(par, data)
    rows = [{"step": i + 1, "fp32": fp32[i], "bf16": bf16[i], "bf16_tp": tp[i],
             "tp_vs_bf16": abs(tp[i] - bf16[i]), "bf16_vs_fp32": abs(bf16[i] - fp32[i])}
            for i in range(args.steps)]
    worst_tp = max(r["tp_vs_bf16"] for r in rows)
    worst_bf16 = max(r["bf16_vs_fp32"] for r in rows)
    if C.rank0():
        if args.json:
            print(json.dumps({"rows": rows, "worst_tp_vs_bf16": worst_tp,
                              "worst_bf16_vs_fp32": worst_bf16}))
        else:
            cols = [("step", "step", ""), ("fp32", "fp32", ".4f"), ("bf16", "bf16", ".4f"),
                    ("bf16_tp", "bf16 tpcompile", ".4f"), ("tp_vs_bf16", "|tp - bf16|", ".4f"),
                    ("bf16_vs_fp32", "|bf16 - fp32|", ".4f")]
            print(C.table([r for r in rows if r["step"] % 5 == 0 or r["step"] == 1], cols))
            print(f"over {args.steps} steps: max |tp - bf16| = {worst_tp:.4f}, "
                  f"max |bf16 - fp32| = {worst_bf16:.4f} (the noise scale); final losses "
                  f"fp32 {fp32[-1]:.4f}, bf16 {bf16[-1]:.4f}, bf16 tpcompile {tp[-1]:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
