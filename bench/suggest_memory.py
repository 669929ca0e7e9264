"""The cost model's memory and step time against a real run on one GPU.

    python bench/suggest_memory.py            # one CUDA device (a CPU run is a dry run)

Calibrates the device (``tpcompile.calibrate()``), then for a Hugging Face Llama (hidden
2048, 8 layers, 16 heads, 8 kv heads, vocab 32000; ``--tiny`` for a dry run) at a few
batch sizes: what ``suggest``'s cost model predicts for a (dp 1, tp 1) mesh with bf16
compute on fp32 master weights (FSDP2 mixed precision, as ``Suggestion.kwargs()`` sets
it), and what ``auto_parallelize`` with those arguments then measures: peak allocated
memory over steady-state steps (forward, an fp32 cross-entropy, backward, AdamW) and the
median step time. Prints both, and JSON to ``$OUT/suggest_memory.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tpcompile  # noqa: E402
from tpcompile.suggest.search import price_mesh  # noqa: E402

GiB = 2**30


def config(tiny: bool) -> dict:
    if tiny:
        return dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=256, vocab_size=512)
    return dict(model_type="llama", hidden_size=2048, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=8, intermediate_size=5632, vocab_size=32000)


def build(cfg: dict, device: str | torch.device = "meta") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    c = AutoConfig.for_model(**cfg)
    c.use_cache = False
    with torch.device(device):
        return AutoModelForCausalLM.from_config(c)


def measure(cfg: dict, kwargs: dict, batch: int, seq: int, device: torch.device,
            steps: int) -> tuple[int, float]:
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (1, 1),
                                                          mesh_dim_names=("dp", "tp"))
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), device=device)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    # built on the device: a meta-built HF model traced on meta inputs bakes the meta
    # device into its program (see the report), and on device inputs does not trace
    model = tpcompile.auto_parallelize(build(cfg, device), mesh, example_kwargs={"input_ids": x},
                                       **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(2 + steps):
        if i == 2 and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        del logits  # as torchtitan does: the loss keeps what backward needs
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    del model, opt
    return peak, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a small model (a CPU dry run)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    t0 = time.perf_counter()
    preset = tpcompile.calibrate()
    dt = "bf16" if cuda else "fp32"
    print(f"calibrated in {time.perf_counter() - t0:.1f} s: {preset.peak_flops[dt] / 1e12:.1f} "
          f"TFLOP/s {dt} (n_1/2 {preset.matmul_half_size:.0f}), memory "
          f"{preset.memory_bandwidth / 1e12:.2f} TB/s, {preset.op_overhead * 1e6:.1f} us per op, "
          f"{preset.memory_bytes / GiB:.0f} GiB", flush=True)
    cfg = config(args.tiny)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        s = price_mesh(build(cfg), dp=1, tp=1, batch=batch, seq_len=args.seq,
                       sequence_parallel=False, dtype=dt, device=preset)
        assert s is not None
        peak, step = measure(cfg, s.kwargs(), batch, args.seq, device, args.steps)
        m = s.memory
        rows.append({"batch": batch, "seq": args.seq, "predicted_peak": m.total,
                     "measured_peak": peak, "predicted_step_s": s.step_time_s,
                     "measured_step_s": step, "breakdown": s.memory.model_dump(),
                     "time": s.time.model_dump()})
        print(f"batch {batch} x {args.seq}: memory predicted {m.total / GiB:.2f} GiB (params "
              f"{m.params / GiB:.2f}, grads {m.grads / GiB:.2f}, optimizer {m.optimizer / GiB:.2f}, "
              f"activations {m.activations / GiB:.2f}, transient {m.transient / GiB:.2f}), "
              f"measured peak {peak / GiB:.2f} GiB ({peak / m.total:.3f}x); step predicted "
              f"{s.step_time_s * 1e3:.1f} ms, measured {step * 1e3:.1f} ms "
              f"({step / s.step_time_s:.3f}x)", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "suggest_memory.json"), "w") as f:
            json.dump({"preset": preset.model_dump(mode="json"), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
