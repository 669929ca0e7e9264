"""Planning time against depth, Llama-2-7B- and 70B-sized configs on the meta device.

    OMP_NUM_THREADS=1 python bench/planning.py [--depths 2,8,32,80] [--tp 8] [--json]

One process, no torchrun, no real weights. Two numbers per model:
  plan     ``tpcompile.plan(model, tp=...)``: trace + analyze + plan, no process group;
  compile  ``auto_parallelize`` on a fake process group of ``--tp`` ranks (the ``fake``
           c10d backend): plan + rewrite + swapping the parameters for (meta) DTensors.
Model construction is not timed. Each number is the median of ``--repeats`` runs, each on
a freshly built model. Repeated blocks are analysed once, so the cost should stay
nearly flat in depth. Targets (issue 6): 7B <= 1.0 s, 80-layer 70B <= 1.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import tpcompile  # noqa: E402
from bench.common import table  # noqa: E402
from models.llama2 import Transformer, config  # noqa: E402

# (config, depth) -> seconds: the 7B config proper (32 blocks) and 80-block 70B; the HF
# LlamaForCausalLM at 7B, export included
TARGET_S = {("7B", 32): 1.0, ("70B", 80): 1.2, ("hf-7B", 32): 2.0}
HF_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, use_cache=False)


def meta_model(name: str, depth: int) -> torch.nn.Module:
    with torch.device("meta"):
        if name == "hf-7B":
            from transformers import LlamaConfig, LlamaForCausalLM
            return LlamaForCausalLM(LlamaConfig(num_hidden_layers=depth, **HF_7B))
        return Transformer(config(name, n_layers=depth))


def inputs(name: str, tp: int) -> dict:
    """Example inputs: token ids (batch 2, sequence 2 tp), on meta."""
    ids = torch.zeros(2, 2 * tp, dtype=torch.long, device="meta")
    return {"example_kwargs": {"input_ids": ids}} if name == "hf-7B" else \
        {"example_inputs": (ids,)}


def fake_group(world: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def timed(fn, name: str, depth: int, repeats: int) -> float:
    ts = []
    from tpcompile import frontend
    for _ in range(repeats):
        model = meta_model(name, depth)
        frontend.clear_cache()  # time tracing too, not the replay of a remembered trace
        t0 = time.perf_counter()
        fn(model)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(name: str, depth: int, tp: int, repeats: int, mesh) -> dict:
    kw = inputs(name, tp)
    plan_s = timed(lambda m: tpcompile.plan(m, tp=tp, **kw), name, depth, repeats)
    row = {"config": name, "depth": depth, "tp": tp, "plan_s": plan_s}
    if mesh is not None:
        row["compile_s"] = timed(lambda m: tpcompile.auto_parallelize(
            m, mesh, materialize=False, **kw), name, depth, repeats)
    target = TARGET_S.get((name, depth))
    worst = row.get("compile_s", plan_s)
    row["target_s"] = target if target is not None else "-"
    row["meets"] = ("yes" if worst <= target else "NO") if target is not None else "-"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="7B,70B,hf-7B")
    p.add_argument("--depths", default="2,8,32,80")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-fake-pg", action="store_true", help="time planning only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.simplefilter("ignore")
    mesh = None
    if not args.no_fake_pg:
        fake_group(args.tp)
        mesh = init_device_mesh("cpu", (args.tp,), mesh_dim_names=("tp",))
    timed(lambda m: tpcompile.plan(m, tp=args.tp), "7B", 2, 1)  # imports, first-call caches
    rows = [measure(name, int(d), args.tp, args.repeats, mesh)
            for name in args.configs.split(",") for d in args.depths.split(",")]
    if args.json:
        print(json.dumps({"meta": {"what": "planning", "torch": torch.__version__}, "rows": rows},
                         indent=1))
    else:
        cols = [("config", "config", ""), ("depth", "blocks", ""), ("tp", "tp", ""),
                ("plan_s", "plan s", ".3f")]
        if mesh is not None:
            cols.append(("compile_s", "plan+rewrite s", ".3f"))
        cols += [("target_s", "target s", ""), ("meets", "meets", "")]
        print(table(rows, cols))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
