"""Does ``tpcompile.suggest`` rank meshes the way they measure? (CPU/gloo, world 4)

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=4 bench/suggest_rank.py

For a small Llama (the tutorial config of ``models/llama2.py``, vocab 4096) times every
(dp, tp) x sequence-parallel configuration of a world of 4 at three global batch sizes
(one micro-batch per dp rank, no checkpointing), each a real ``auto_parallelize`` on a
2-D ("dp", "tp") mesh with FSDP2 on dp and AdamW, all their steps interleaved; calibrates
this machine (``tpcompile.calibrate()``) before, between and after them and prices them
with their median;
prints the predicted and measured step times, the Spearman rank correlation between
them, and per batch size how far the predicted best is from the measured best.

    OMP_NUM_THREADS=1 python bench/suggest_rank.py --timing

times ``suggest`` itself for world sizes up to 1024 (the 70B config, on h100-80gb): the
first call plans the model, the others are the closed-form search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import tpcompile
from models.llama2 import Transformer, config
from tpcompile.suggest import DevicePreset, save_device


def rank_of(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = rank_of(a), rank_of(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def build(layers: int, vocab: int) -> Transformer:
    with torch.device("meta"):
        return Transformer(config("tutorial", n_layers=layers, vocab_size=vocab))


class Run:
    """One configuration, parallelized and ready to step."""

    def __init__(self, args: argparse.Namespace, dp: int, tp: int, sp: bool, batch: int) -> None:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        self.model = tpcompile.auto_parallelize(build(args.layers, args.vocab), mesh,
                                                sequence_parallel=sp, seed=0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1 + mesh.get_local_rank("dp"))
        tokens = torch.randint(0, args.vocab, (batch // dp, args.seq + 1), generator=g)
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.times: list[float] = []

    def step(self) -> float:
        """Seconds of one training step, the slowest rank's."""
        dist.barrier()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x).flatten(0, 1), self.y.flatten()).backward()
        self.opt.step()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def measure(args: argparse.Namespace, runs: list[Run]) -> tuple[list[float], list[DevicePreset]]:
    """Median step time of each run, their steps interleaved round-robin so the load of a
    shared machine falls on all of them alike; and ``args.calibrations`` calibrations
    spread over the rounds (the load drifts while they run)."""
    rounds = args.warmup + args.steps
    at = {round(i * rounds / max(args.calibrations - 1, 1)) for i in range(args.calibrations)}
    presets = []
    for i in range(rounds + 1):
        if i in at:
            presets.append(tpcompile.calibrate())
        if i == rounds:
            break
        for r in runs:
            t = r.step()
            if i >= args.warmup:
                r.times.append(t)
    return [statistics.median(r.times) for r in runs], presets


def average(presets: list[DevicePreset]) -> DevicePreset:
    """The calibrations' median, field by field: compute rates, overheads and every
    collective fit (one disturbed calibration, a matmul read at half its rate, moves a
    mean by a sixth and a median not at all)."""
    mean = statistics.median
    first = presets[0]
    fits = []
    for f in first.fits:
        same = [g for p in presets for g in p.fits
                if (g.kind, g.level, g.group, g.per_node) == (f.kind, f.level, f.group, f.per_node)]
        fits.append(f.model_copy(update={"alpha": mean([g.alpha for g in same]),
                                         "beta": mean([g.beta for g in same])}))
    return first.model_copy(update={
        "peak_flops": {k: mean([p.peak_flops[k] for p in presets]) for k in first.peak_flops},
        "matmul_half_size": mean([p.matmul_half_size for p in presets]),
        "memory_bandwidth": mean([p.memory_bandwidth for p in presets]),
        "op_overhead": mean([p.op_overhead for p in presets]),
        "loss_per_logit": mean([p.loss_per_logit or 0.0 for p in presets]),
        "fsdp_overlap": mean([p.fsdp_overlap for p in presets]), "fits": fits})


def summary(p: DevicePreset) -> str:
    return (f"matmul {p.peak_flops['fp32'] / 1e9:.1f} GFLOP/s, memory {p.memory_bandwidth / 1e9:.1f} "
            f"GB/s, op {p.op_overhead * 1e6:.0f} us, loss {(p.loss_per_logit or 0) * 1e9:.1f} ns/logit, "
            f"overlap {p.fsdp_overlap:.2f}")


def timing() -> None:
    """How long ``suggest`` takes: the first call for a model plans it (traces, analyses,
    reads the programs: what ``tpcompile.plan`` costs), later calls (other world sizes,
    batches, devices) are the closed-form search alone."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=28672, vocab_size=128256)
    print("suggest, Llama-3.1-70B config (HF LlamaConfig), h100-80gb, seq 8192, global batch "
          "max(world, 256)")
    for world in (8, 64, 256, 1024):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = tpcompile.suggest(cfg, world, global_batch=max(world, 256), seq_len=8192)
            times.append(time.perf_counter() - t0)
        first = "" if world > 8 else f"first call (planning) {times[0]:.2f} s, "
        print(f"  world {world:>5}: {first}search {min(times[1:]):.3f} s, {len(out)} candidates; "
              f"best: {out[0].label() if out[0].feasible else 'nothing fits'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", default="4,8,16", help="global batch sizes (sequences)")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preset", default=os.path.join(tempfile.gettempdir(), "tpcompile-cpu.json"),
                   help="where to write the calibrated preset")
    p.add_argument("--calibrations", type=int, default=3,
                   help="calibrations spread over the measurement rounds (default 3)")
    p.add_argument("--timing", action="store_true", help="time suggest itself instead (one "
                   "process, no torchrun)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.timing:
        return timing()
    dist.init_process_group("gloo")
    world, rank0 = dist.get_world_size(), dist.get_rank() == 0
    configs = [(world // tp, tp, sp) for tp in (1, 2, 4) if world % tp == 0
               for sp in ([False, True] if tp > 1 else [False])]
    batches = [int(b) for b in args.batches.split(",")]
    runs = [Run(args, dp, tp, sp, batch) for batch in batches for dp, tp, sp in configs]
    t0 = time.perf_counter()
    measured, presets = measure(args, runs)
    preset = average(presets)
    if rank0:
        save_device(preset, args.preset)
        print(f"{len(runs)} runs and {len(presets)} calibrations in "
              f"{time.perf_counter() - t0:.0f} s; calibrated:")
        print("\n".join(f"  {summary(p)}" for p in presets) + f"\n  median {summary(preset)}")
        print(f"wrote {args.preset}")
    rows = []
    for i, batch in enumerate(batches):
        found = tpcompile.suggest(build(args.layers, args.vocab), world, gpus_per_node=world,
                                  device=preset, global_batch=batch, seq_len=args.seq,
                                  dtype="fp32", activation_checkpointing="none")
        for (dp, tp, sp), m in zip(configs, measured[i * len(configs):]):
            s = next(x for x in found if x.mesh_shape == (dp, tp) and x.sequence_parallel == sp
                     and x.micro_batch == batch // dp)
            rows.append({"batch": batch, "dp": dp, "tp": tp, "sp": sp,
                         "predicted_s": s.step_time_s, "measured_s": m})
    if not rank0:
        dist.destroy_process_group()
        return
    pred, meas = [r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]
    rho = spearman(pred, meas)
    print(f"\n{'batch':>5} {'dp x tp':>8} {'SP':>3} {'predicted s':>12} {'measured s':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['dp']:>4} x {r['tp']:<2} {'on' if r['sp'] else 'off':>3} "
              f"{r['predicted_s']:>12.4f} {r['measured_s']:>11.4f}")
    print(f"\nSpearman rank correlation, all {len(rows)} configurations: {rho:.3f}")
    worst = 0.0
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        picked = min(mine, key=lambda r: r["predicted_s"])
        best = min(mine, key=lambda r: r["measured_s"])
        gap = picked["measured_s"] / best["measured_s"] - 1
        worst = max(worst, gap)
        r_b = spearman([r["predicted_s"] for r in mine], [r["measured_s"] for r in mine])
        print(f"  batch {batch:>3}: predicted best dp {picked['dp']} x tp {picked['tp']} SP "
              f"{'on' if picked['sp'] else 'off'} measures {gap * 100:+.1f} % from the measured "
              f"best (dp {best['dp']} x tp {best['tp']} SP {'on' if best['sp'] else 'off'}); "
              f"Spearman within the batch {r_b:.2f}")
    print(f"worst predicted-best gap {worst * 100:.1f} % (target <= 10 %); Spearman {rho:.3f} "
          "(target >= 0.8)")
    if args.json:
        print(json.dumps({"spearman": rho, "worst_gap": worst, "rows": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
