"""A cross-entropy over class scores sharded on their class dim, for rewritten graphs.

A colwise head leaves each tp rank one block of columns of the logits. The model's own
``cross_entropy`` then runs vocab-parallel instead of on gathered logits: each rank
computes, per row, the log-sum-exp of its columns, the target's logit when the target
is one of its classes (else 0) and, with label smoothing, the sum of its logits; one
all-gather of those few numbers per row gives every rank the row's whole log-sum-exp,
target logit and sum, so every rank computes the same loss. Backward needs no
collective: the gradient of a rank's columns is ``softmax - (1 - e) onehot - e / C``
over those columns, scaled by the row's share of the loss, all known locally.
That is tp times less cross-entropy work per rank, and logits nobody reads whole are
never gathered.
"""

from __future__ import annotations

from typing import Any

import torch

from .collectives import COLLECTIVES, _c10d, _rank, _size

_NONE, _MEAN, _SUM = 0, 1, 2  # ATen's reduction enum


def _rows(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C)`` scores and ``(N,)`` targets, from ``(N, C, d1, ...)`` and ``(N, d1, ...)``."""
    if x.dim() == 2:
        return x, target
    return x.movedim(1, -1).reshape(-1, x.shape[1]), target.reshape(-1)


class _VocabCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, target: torch.Tensor, reduction: int,
                ignore_index: int, smoothing: float, group: str,
                out_dtype: torch.dtype) -> torch.Tensor:
        n, r = _size(group), _rank(group)
        scores, t = _rows(x, target)
        cols = scores.shape[1]
        classes = cols * n
        valid = t != ignore_index
        _check_targets(t, valid, classes)
        mine = valid & (t >= r * cols) & (t < (r + 1) * cols)
        at = torch.where(mine, t - r * cols, 0)
        s32 = scores.float()
        # log-softmax over this rank's classes: one fused pass, kept for backward in place
        # of the scores (the same bytes); its log-sum-exp is a column's score - logp, read
        # at the row's largest score (finite where any is, as masked -inf scores are not).
        # logp is the scores less a row constant, so its largest is at the same column:
        # two amax passes, ~4x faster on the CPU than a max that also finds the column
        logp = torch.log_softmax(s32, 1)
        top = s32.amax(1, keepdim=True)
        dead = top == float("-inf")  # every class of this rank masked: log-softmax nan
        if _unconditional(s32) or bool(dead.any()):
            logp.masked_fill_(dead, float("-inf"))  # those classes' probability is 0
        local = torch.where(dead, float("-inf"), top - logp.amax(1, keepdim=True)).squeeze(1)
        stats = [local, torch.where(mine, s32.gather(1, at[:, None]).squeeze(1), 0.0)]
        if smoothing:
            stats.append(s32.sum(1))
        del s32
        both = torch.stack(stats, 1)  # (rows, k)
        got = _c10d.wait_tensor(_c10d.all_gather_into_tensor(both, n, group)).view(n, *both.shape)
        lse = torch.logsumexp(got[..., 0], 0)
        loss = lse - got[..., 1].sum(0)
        if smoothing:
            loss = (1 - smoothing) * loss + smoothing * (lse - got[..., 2].sum(0) / classes)
        loss = torch.where(valid, loss, 0.0)
        count = valid.sum()
        ctx.save_for_backward(logp, lse - local, at, mine, valid, count)
        ctx.reduction, ctx.smoothing, ctx.classes = reduction, smoothing, classes
        ctx.dtype, ctx.xshape = x.dtype, x.shape
        if reduction == _NONE:
            return loss.view(target.shape).to(out_dtype)
        total = loss.sum()
        return (total / count if reduction == _MEAN else total).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        logp, shift, at, mine, valid, count = ctx.saved_tensors
        if ctx.reduction == _NONE:
            per = g.reshape(-1).float()
        else:
            per = (g.float() / count if ctx.reduction == _MEAN else g.float()).expand(shift.shape)
        per = torch.where(valid, per, 0.0)  # (rows,): each row's share of the loss (no
        # target: 0, also where the mean over no targets made it inf, as torch's gradient)
        grad = (logp - shift[:, None]).exp_().mul_(per[:, None])  # the softmax, times the share
        if ctx.smoothing:
            grad.sub_((per * (ctx.smoothing / ctx.classes))[:, None])
        grad.scatter_add_(1, at[:, None], (-(1 - ctx.smoothing) * per * mine)[:, None])
        grad = grad.to(ctx.dtype)
        if len(ctx.xshape) > 2:  # back to (N, C, d1, ...)
            grad = grad.view(ctx.xshape[0], *ctx.xshape[2:], ctx.xshape[1]).movedim(-1, 1)
        return grad, None, None, None, None, None, None


def _unconditional(x: torch.Tensor) -> bool:
    """Whether a fix-up runs without first asking (on the host) if it is needed: compiled
    (no data-dependent branch) and on accelerators (asking would synchronise)."""
    return torch.compiler.is_compiling() or x.device.type != "cpu"


def _check_targets(t: torch.Tensor, valid: torch.Tensor, classes: int) -> None:
    """Targets outside ``[0, classes)`` (other than ``ignore_index``): torch's IndexError
    on the CPU, a device-side assertion elsewhere (as torch's own kernels do)."""
    bad = valid & ((t < 0) | (t >= classes))
    if _unconditional(t):
        torch._assert_async(~bad.any(), f"cross_entropy: a target is out of bounds [0, {classes})")
    elif bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")


def vocab_cross_entropy(x: torch.Tensor, target: torch.Tensor, reduction: int, ignore_index: int,
                        smoothing: float, group: str) -> torch.Tensor:
    """``aten.cross_entropy_loss(x, target, None, reduction, ignore_index, smoothing)`` on
    this rank's block of ``x``'s classes (dim 1); the whole loss, equal on every rank."""
    # under autocast torch runs cross_entropy in float32 and returns float32
    out = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    return _VocabCrossEntropy.apply(x, target, reduction, ignore_index, smoothing, group, out)


COLLECTIVES[vocab_cross_entropy] = ("all_gather", None)
