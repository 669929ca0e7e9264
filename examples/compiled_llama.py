"""Train the Llama-2 style model of models/ with tpcompile: tensor + sequence parallel on
the "tp" mesh dimension (detected from the traced graph, no hand-written plan), FSDP2 on
"dp". The model is built on the meta device and each rank materialises only its shards.

    torchrun --nproc_per_node=4 examples/compiled_llama.py            # dp 2 x tp 2, CPU/gloo
    torchrun --nproc_per_node=4 examples/compiled_llama.py --steps 20 \\
        --checkpoint-dir ckpt --checkpoint-every 5                     # then add --resume

CUDA/NCCL is used when GPUs are present, CPU/gloo otherwise. The data is synthetic
(nothing is downloaded): token sequences from a fixed random Markov chain over a few
hundred token ids, so there is something to learn and the loss falls. Every dp rank
draws its own batch, from (seed, step, dp rank), so a resumed run sees the same data.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # torchrun runs us as a script

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402

import tpcompile  # noqa: E402
from models.llama2 import CONFIGS, Transformer, config  # noqa: E402
from tpcompile import checkpoint as ckpt  # noqa: E402
from tpcompile.runtime.distribute import local_param_bytes  # noqa: E402

logger = logging.getLogger("compiled_llama")
ALPHABET = 512  # distinct token ids the synthetic text uses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default="tutorial", choices=sorted(CONFIGS),
                    help="model size (tutorial: dim 256, 2 layers, 16 heads, vocab 32000)")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size; dp = WORLD_SIZE / tp")
    ap.add_argument("--steps", type=int, default=10, help="train until this step")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per dp rank per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0, help="weights and data")
    ap.add_argument("--activation-checkpointing", default="none",
                    help="'none', 'block' (every block) or a number of blocks: recompute "
                    "their forward in backward instead of keeping their activations")
    ap.add_argument("--checkpoint-dir", default=None, help="save DCP checkpoints here")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="save every K steps (0: only after the last step)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint in --checkpoint-dir")
    args = ap.parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        ap.error("--resume needs --checkpoint-dir")
    return args


def rank_log(msg: str) -> None:
    if dist.get_rank() == 0:
        logger.info(msg)


def make_mesh(tp: int) -> DeviceMesh:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp:
        raise SystemExit(f"WORLD_SIZE = {world} is not divisible by --tp {tp}; "
                         f"pick a --tp that divides {world}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return init_device_mesh(device, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def markov_chain(seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids used, successors): state i is token ids[i]; its 4 likely successors
    are the states successors[i]. The same on every rank."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:min(ALPHABET, vocab)]
    return ids, torch.randint(0, len(ids), (len(ids), 4), generator=g)


def batch(step: int, dp_rank: int, args: argparse.Namespace, vocab: int,
          device: str) -> torch.Tensor:
    """This dp rank's sequences for ``step``: random walks on the chain, seq_len + 1
    tokens long (inputs and their next-token targets)."""
    ids, successors = markov_chain(args.seed, vocab)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + dp_rank)
    state = torch.randint(0, len(ids), (args.batch_size,), generator=g)
    choice = torch.randint(0, 4, (args.seq_len, args.batch_size), generator=g)
    states = [state]
    for c in choice:
        states.append(successors[states[-1], c])
    return ids[torch.stack(states, 1)].to(device)


def build(args: argparse.Namespace, mesh: DeviceMesh) -> Transformer:
    margs = config(args.config, max_seq_len=max(args.seq_len, CONFIGS[args.config].max_seq_len))
    with torch.device("meta"):  # no rank ever holds the whole model
        model = Transformer(margs)
    ckpt = args.activation_checkpointing
    model = tpcompile.auto_parallelize(
        model, mesh, seed=args.seed,
        activation_checkpointing=int(ckpt) if ckpt.isdigit() else ckpt)
    plan = tpcompile.plan_of(model)
    for mp in plan.modules:
        by_style: dict[str, list[str]] = {}
        for layer, style in mp.styles.items():
            by_style.setdefault(style, []).append(layer)
        shown = "; ".join(f"{s}: {' '.join(sorted(ls))}" for s, ls in sorted(by_style.items()))
        rank_log(f"Plan {mp.path or '<root>'} ({len(mp.members)} x {mp.module_type}): {shown}")
    total = sum(p.numel() for p in model.parameters())
    rank_log(f"Model after parallelization: {total / 1e6:.2f}M parameters, "
             f"{local_param_bytes(model) / 2**20:.2f} MiB on each rank (meta-built, "
             f"materialised sharded, FSDP2 per block on dp)")
    return model


def loss_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def progress(done: int, total: int, width: int = 20) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(args: argparse.Namespace) -> list[float]:
    mesh = make_mesh(args.tp)
    device, dp_mesh = mesh.device_type, mesh["dp"]
    rank_log(f"Device Mesh created: device_mesh={mesh}")
    model = build(args, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = 0
    if args.resume:
        found = ckpt.latest(args.checkpoint_dir)
        if found is None:
            rank_log(f"No checkpoint in {args.checkpoint_dir}; starting from step 0")
        else:
            start = ckpt.load(found, model, opt, require_optimizer_state=False)
            rank_log(f"Resumed from {found} at step {start}")
    tokens_per_step = args.batch_size * args.seq_len * dp_mesh.size()
    rank_log("2D training starting...")
    losses, t0, timed_from = [], time.perf_counter(), None
    for step in range(start, args.steps):
        if step == start + 1:  # the first step warms up; time the rest
            t0, timed_from = time.perf_counter(), step
        x = batch(step, dp_mesh.get_local_rank(), args, model.args.vocab_size, device)
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=dp_mesh.get_group())
        losses.append(mean.item() / dp_mesh.size())
        rate = ""
        if timed_from is not None and step >= timed_from:
            rate = f" {tokens_per_step * (step - timed_from + 1) / (time.perf_counter() - t0):,.0f} tok/s"
        rank_log(f"2D iter {step} complete, loss {losses[-1]:.4f} "
                 f"{progress(step + 1, args.steps)}{rate}")
        last = step + 1 == args.steps
        every = args.checkpoint_every and (step + 1) % args.checkpoint_every == 0
        if args.checkpoint_dir and (last or every):
            rank_log(f"Checkpoint saved: {ckpt.save(args.checkpoint_dir, model, opt, step + 1)}")
    rank_log("2D training successfully completed!")
    summary(args, losses, tokens_per_step, t0, timed_from, device, start)
    return losses


def summary(args: argparse.Namespace, losses: list[float], tokens_per_step: int, t0: float,
            timed_from: int | None, device: str, start: int) -> None:
    seconds = time.perf_counter() - t0
    peaks: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_memory_mib(device))
    if not losses:
        rank_log(f"Summary: nothing to do (already at step {start} of {args.steps})")
        return
    timed = args.steps - timed_from if timed_from is not None else 0
    rate = f"{tokens_per_step * timed / seconds:,.0f} tokens/s ({seconds / timed:.3f} s/step, " \
           f"first step excluded)" if timed else "n/a (one step)"
    what = "peak CUDA memory allocated" if device == "cuda" else "peak RSS"
    rank_log(f"Summary: steps {start}..{args.steps - 1}, loss {losses[0]:.4f} -> "
             f"{losses[-1]:.4f}, {rate}, {tokens_per_step} tokens/step")
    rank_log(f"Summary: {what} per rank (MiB): " + ", ".join(
        f"rank {r}: {m:.0f}" for r, m in enumerate(peaks)))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s  %(message)s", datefmt="%m/%d/%Y %I:%M:%S %p",
                        level=logging.INFO)
    args = parse_args(argv)
    tpcompile.init_distributed()  # NCCL (+ gloo for CPU tensors) or gloo; survives restarts
    print(f"Starting tpcompile 2D (FSDP + TP) example on rank {dist.get_rank()}.", flush=True)
    try:
        train(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
