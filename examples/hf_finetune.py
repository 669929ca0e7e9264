"""Fine-tune a Hugging Face causal LM from a local folder with tpcompile: dp x tp on the
mesh, DCP checkpoints with resume, the result saved as a folder transformers loads, and a
greedy sample at the end.

    python examples/hf_finetune.py --make-model tiny-llama            # a random tiny Llama folder
    torchrun --nproc_per_node=4 examples/hf_finetune.py --model tiny-llama --out tuned \\
        --steps 8 --checkpoint-dir ckpt --checkpoint-every 4            # later: add --resume

Nothing is downloaded: ``--make-model`` writes a tiny randomly initialised Llama with
transformers' own ``save_pretrained``; any local folder of a causal LM works the same.
The data is synthetic (a repeating pattern of token ids), so the loss falls quickly.
CUDA/NCCL is used when GPUs are present, CPU/gloo otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # torchrun runs us as a script

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tpcompile  # noqa: E402
from tpcompile import checkpoint as ckpt  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--make-model", metavar="DIR", help="write a tiny random Llama folder and exit")
    ap.add_argument("--model", help="the Hugging Face folder to fine-tune")
    ap.add_argument("--out", help="save the fine-tuned model here (save_pretrained)")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size; dp = WORLD_SIZE / tp")
    ap.add_argument("--steps", type=int, default=8, help="train until this step")
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per dp rank per step")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--checkpoint-dir", help="DCP checkpoints here")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="every K steps (0: at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = ap.parse_args(argv)
    if not args.make_model and not args.model:
        ap.error("pass --make-model DIR, or --model DIR to fine-tune")
    if args.resume and not args.checkpoint_dir:
        ap.error("--resume needs --checkpoint-dir")
    return args


def make_model(folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, use_cache=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    print(f"wrote a tiny Llama to {folder}")


def batch(step: int, dp_rank: int, args: argparse.Namespace, vocab: int) -> torch.Tensor:
    """Token ids counting up from a random start (mod vocab): next-token prediction of a
    pattern, drawn from (step, dp rank) so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    start = torch.randint(3, vocab, (args.batch_size, 1), generator=g)
    return 3 + (start + torch.arange(args.seq_len)) % (vocab - 3)


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.make_model:
        make_model(args.make_model)
        return
    mesh = tpcompile.init_mesh(args.tp)  # survives torchrun --max-restarts
    dp = dist.get_world_size() // args.tp
    model = tpcompile.from_pretrained(args.model, mesh)
    vocab = model.config.vocab_size
    log(f"{type(model).__name__} from {args.model}: dp {dp} x tp {args.tp}; rank 0 read "
        f"{model.tpcompile_read_bytes / 2**20:.2f} MiB of weights")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)  # before the first forward (FSDP2)
    start = 0
    if args.resume:
        found = ckpt.latest(args.checkpoint_dir)
        if found is not None:
            start = ckpt.load(found, model, opt, require_optimizer_state=False)
            log(f"resumed from {found} (step {start})")
    dp_rank = mesh["dp"].get_local_rank() if dp > 1 else 0
    loss = torch.tensor(float("nan"))
    for step in range(start, args.steps):
        ids = batch(step, dp_rank, args, vocab)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(f"step {step + 1}/{args.steps} loss {loss.item():.4f}")
        if args.checkpoint_dir and ((args.checkpoint_every and (step + 1) % args.checkpoint_every == 0)
                                    or step + 1 == args.steps):
            log(f"checkpoint: {ckpt.save(args.checkpoint_dir, model, opt, step + 1)}")
    if args.out:
        tpcompile.save_pretrained(model, args.out)
        log(f"saved to {args.out} (transformers.AutoModelForCausalLM.from_pretrained loads it)")
    model.eval()
    prompt = batch(0, 0, args, vocab)[:1, :6]
    sample = tpcompile.generate(model, prompt, max_new_tokens=8)
    log(f"final loss {loss.item():.4f}; greedy sample: {prompt[0].tolist()} -> "
        f"{sample[0, 6:].tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
