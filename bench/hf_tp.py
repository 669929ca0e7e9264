"""Step time: tpcompile vs Hugging Face's own tensor parallelism on the same HF Llama.

    pip install accelerate   # transformers' tensor parallelism needs it
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/hf_tp.py [--steps 10] [--json]

Rank 0 writes a Llama folder with transformers (hidden 256, 2 layers, 16 heads, vocab
32000, random weights; nothing downloaded). Both programs load it: transformers with
``from_pretrained(dir, distributed_config=DistributedConfig(tp_size=world))`` (its
``base_model_tp_plan``, ``tp_plan="auto"``), tpcompile with ``tpcompile.from_pretrained(dir,
mesh)`` (its cross-entropy vocab-parallel; a second copy planned with
``vocab_losses(False)`` computes it on gathered logits, as before that existed; a third
is planned with ``sequence_parallel=False``, the sharding transformers' plan has: column-
and row-wise projections, a replicated residual stream, no sequence shards). Each is
checked against the unsharded model (loss, logits and every gradient)
before anything is timed; then training steps (forward with labels, backward, AdamW)
ALTERNATE between them. A step's time is the slowest rank's; the table gives medians and
the ratio tpcompile / transformers. The unsharded model's step is timed too, for scale.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tpcompile  # noqa: E402
from bench import common as C  # noqa: E402
from tpcompile.analysis.ops import vocab_losses  # noqa: E402
from tpcompile.verify import full  # noqa: E402


def write_folder(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=512, use_cache=False)
    LlamaForCausalLM(cfg).save_pretrained(path)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = full(a).detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(ref, par, ids) -> float:
    """Worst relative error of loss, logits and every gradient against ``ref``."""
    for m in (ref, par):
        m.zero_grad(set_to_none=True)
    o_ref, o_par = ref(input_ids=ids, labels=ids), par(input_ids=ids, labels=ids)
    o_ref.loss.backward()
    o_par.loss.backward()
    errs = {"loss": rel(o_par.loss, o_ref.loss), "logits": rel(o_par.logits, o_ref.logits)}
    grads = dict(par.named_parameters())
    for n, p in ref.named_parameters():
        errs[n] = rel(grads[n].grad, p.grad)
    if os.environ.get("HF_TP_DEBUG"):
        print({k: f"{v:.1e}" for k, v in errs.items()}, flush=True)
    for m in (ref, par):
        m.zero_grad(set_to_none=True)
    return max(errs.values())


def _switched(forward):
    def call(*args, **kwargs):
        with vocab_losses(False):
            return forward(*args, **kwargs)
    return call


def step(model, opt, ids) -> None:
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2x64,8x256", help="BATCHxSEQ, comma-separated")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per program")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--loss-parallel", action="store_true",
                    help="tpcompile returns the logits vocab-sharded (loss_parallel=True)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.distributed.configuration_utils import DistributedConfig
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    tmp = tempfile.mkdtemp(prefix="hf_tp_") if dist.get_rank() == 0 else ""
    box = [tmp]
    dist.broadcast_object_list(box)
    folder = os.path.join(box[0], "llama")
    if dist.get_rank() == 0:
        write_folder(folder)
    dist.barrier()
    ref = AutoModelForCausalLM.from_pretrained(folder)
    ref.train()
    hf = AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=world))
    hf.train()
    ours = tpcompile.from_pretrained(folder, mesh, loss_parallel=args.loss_parallel)
    # the same, its loss computed on gathered logits (each call under the switch: a new
    # input size is planned at its first call)
    gathered = tpcompile.from_pretrained(folder, mesh, loss_parallel=args.loss_parallel)
    gathered.forward = _switched(gathered.forward)
    # transformers' plan has no sequence parallelism; the same sharding from tpcompile
    same = tpcompile.from_pretrained(folder, mesh, loss_parallel=args.loss_parallel,
                                     sequence_parallel=False)
    progs = {"tpcompile": ours, "tpcompile_gathered": gathered, "tpcompile_nosp": same,
             "transformers": hf, "unsharded": copy.deepcopy(ref)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in progs.items()}
    rows = []
    batches = {}
    for batch, seq in C.sizes(args.sizes):  # every size checked before any step trains
        g = torch.Generator().manual_seed(batch * 1000 + seq)
        ids = torch.randint(0, 32000, (batch, seq), generator=g)
        errs = {k: check(ref, progs[k], ids) for k in
                ("tpcompile", "tpcompile_gathered", "tpcompile_nosp", "transformers")}
        for k, e in errs.items():
            if not e <= 1e-4:
                raise SystemExit(f"{k} differs from the unsharded model by {e:.2e}")
        batches[batch, seq] = (ids, errs)
    for (batch, seq), (ids, errs) in batches.items():
        for _ in range(args.warmup):
            for k in progs:
                step(progs[k], opts[k], ids)
        times: dict[str, list[float]] = {k: [] for k in progs}
        names = list(progs)
        for i in range(args.steps):
            for k in names if i % 2 == 0 else names[::-1]:
                dist.barrier()
                t0 = time.perf_counter()
                step(progs[k], opts[k], ids)
                times[k].append(time.perf_counter() - t0)
        med = {}
        for k, ts in times.items():  # a step takes as long as its slowest rank
            t = torch.tensor(ts, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[k] = t.tolist()
            med[k] = C.median(times[k])
        rows.append({"batch": batch, "seq": seq, "tpcompile_ms": 1e3 * med["tpcompile"],
                     "gathered_ms": 1e3 * med["tpcompile_gathered"],
                     "nosp_ms": 1e3 * med["tpcompile_nosp"],
                     "transformers_ms": 1e3 * med["transformers"],
                     "unsharded_ms": 1e3 * med["unsharded"],
                     "ratio": med["tpcompile"] / med["transformers"],
                     **C.interval(times["tpcompile"], times["transformers"]),
                     "ratio_nosp": med["tpcompile_nosp"] / med["transformers"],
                     "ratio_nosp_ci": C.interval(times["tpcompile_nosp"],
                                                 times["transformers"])["ratio_ci"],
                     "err_tpcompile": max(errs[k] for k in errs if k.startswith("tpcompile")),
                     "err_transformers": errs["transformers"]})
    cols = [("batch", "batch", ""), ("seq", "seq", ""), ("tpcompile_ms", "tpcompile ms", ".1f"),
            ("gathered_ms", "tpcompile, loss on gathered logits ms", ".1f"),
            ("nosp_ms", "tpcompile, no SP ms", ".1f"),
            ("transformers_ms", "transformers TP ms", ".1f"), ("unsharded_ms", "unsharded ms", ".1f"),
            ("ratio", "tpcompile/transformers", ".3f"), ("ratio_ci", "90% interval", ""),
            ("ratio_nosp", "no SP/transformers", ".3f"), ("ratio_nosp_ci", "90% interval", ""),
            ("err_tpcompile", "err tpc", ".1e"),
            ("err_transformers", "err HF", ".1e")]
    C.emit({"what": "hf_tp", "model": "LlamaForCausalLM h256 L2 heads16 vocab32000",
            "loss_parallel": args.loss_parallel,
            "steps": args.steps, **C.machine()}, rows, cols, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
