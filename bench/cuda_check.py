"""The CUDA path, checked against the unsharded model on a GPU machine.

    torchrun --nproc_per_node=2 bench/cuda_check.py

Each rank builds the models on its CUDA device, parallelizes them over a ``cuda`` mesh and
compares outputs and every gradient with the unsharded model (tests/harness.py's judge,
float64 shadow included). With one GPU for several ranks NCCL refuses to start (one
device per rank), so the ranks then share the GPU over gloo, which moves CUDA tensors
through host memory: slow, but the same programs, placements and device handling.
Prints one line per model and sequence-parallel setting; exits non-zero on a mismatch.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tpcompile  # noqa: E402
from tests import jobs_hf, jobs_shapes  # noqa: E402
from tests.harness import judge  # noqa: E402
from tpcompile.verify import verdict  # noqa: E402

MODELS = ["llama", "reference_llama", "nanogpt", "mha", "qwen3"]
# sequence parallel on and off; gloo's all-gather of CUDA tensors crashed (SIGSEGV, torch
# 2.11) when ranks share one GPU, so such a run takes CUDA_CHECK_SP=0 (all-reduces only)
# and TPCOMPILE_CHECK_INPUTS=0 (the input check all-gathers a digest)
SP = [s == "1" for s in os.environ.get("CUDA_CHECK_SP", "0,1").split(",")]


def main() -> int:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script
    shared = torch.cuda.device_count() < int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(0 if shared else local)
    dist.init_process_group("gloo" if shared else "nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = torch.distributed.device_mesh.init_device_mesh(device, (world,), mesh_dim_names=("tp",))
    failed = 0
    for name in MODELS:
        for sp in SP:
            ref, args, kwargs = jobs_shapes.build(name)
            ref = ref.to(device)
            args = tuple(a.to(device) for a in args)
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
            t0 = time.perf_counter()
            par = tpcompile.auto_parallelize(copy.deepcopy(ref), mesh, example_inputs=args,
                                             example_kwargs=kwargs, sequence_parallel=sp)
            report = judge(ref, par, args, kwargs=kwargs, loss_fn=jobs_hf.loss_of)
            reports: list = [None] * world
            dist.all_gather_object(reports, report)
            problems = verdict(reports)
            failed += bool(problems)
            devices = {str(p.device) for p in par.parameters()}
            if rank == 0:
                print(f"{name:16s} sp={sp!s:5s} tp={world} devices={sorted(devices)} "
                      f"{'OK' if not problems else 'MISMATCH'} worst={report.worst[1]:.2e} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
                for p in problems[:5]:
                    print("   ", p, flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
