"""Token cross entropy whose forward also computes the gradient, so no softmax is ever stored.

One program per row: a first sweep over the vocabulary in BLOCK_SIZE chunks keeps an online
max and sum of exponentials (log-sum-exp without a second read for the max), a second sweep
writes softmax - onehot. The backward only scales that stored gradient. The design is
Liger-Kernel's (``liger_kernel/ops/cross_entropy.py``); the tile values are arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100  # torch's default: rows with this target add nothing to loss or gradient


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, grad_ptr, targets_ptr, loss_ptr,
    V, stride_row, grad_stride_row,
    IGNORE: tl.constexpr, BLOCK_SIZE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    """loss[row] = logsumexp(logits[row]) - logits[row, target] (fp32);
    grad[row] = softmax(logits[row]) - onehot(target), in grad's dtype (may alias logits)."""
    row = tl.program_id(0).to(tl.int64)  # int64: N * V passes 2^31 at GPT-2's vocabulary
    logits_ptr += row * stride_row
    grad_ptr += row * grad_stride_row
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_SIZE)

    if target == IGNORE:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_SIZE):
                offs = start + cols
                tl.store(grad_ptr + offs, tl.zeros((BLOCK_SIZE,), tl.float32).to(grad_ptr.dtype.element_ty),
                         mask=offs < V)
        return

    # Sweep 1: running max m and running sum d = sum(exp(x - m)), rescaled when m grows.
    # Masked lanes load -inf, so they add exp(-inf) = 0. Every chunk holds at least one real
    # lane, so the chunk max is finite and exp(m - m_new) is never exp(-inf + inf).
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_SIZE):
        offs = start + cols
        x = tl.load(logits_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    target_logit = tl.load(logits_ptr + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.log(d) + m - target_logit)

    if COMPUTE_GRAD:
        # Sweep 2: each chunk is read before it is written, by this program only, so writing
        # the gradient over the logits (grad_ptr == logits_ptr) is safe.
        for start in range(0, V, BLOCK_SIZE):
            offs = start + cols
            mask = offs < V
            x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            grad = tl.exp(x - m) / d - tl.where(offs == target, 1.0, 0.0)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, block_size: int, num_warps: int,
                overwrite_logits: bool) -> torch.Tensor:
        N, V = logits.shape
        compute_grad = ctx.needs_input_grad[0]
        # The stored gradient is softmax - onehot, not yet divided by the token count: in
        # fp16, (softmax - onehot) / N underflows for a large vocabulary and batch, so the
        # 1/N goes into the backward's scale factor instead.
        if compute_grad and overwrite_logits:
            grad = logits
            # A new version: any other autograd node that saved these logits now fails loudly
            # in its backward ("modified by an inplace operation") instead of reading garbage.
            torch.autograd.graph.increment_version(logits)
        elif compute_grad:
            grad = torch.empty_like(logits)
        else:
            grad = logits  # not written: COMPUTE_GRAD is off
        loss_rows = torch.empty(N, device=logits.device, dtype=torch.float32)
        _cross_entropy_kernel[(N,)](
            logits, grad, targets, loss_rows, V, logits.stride(0), grad.stride(0),
            IGNORE=IGNORE_INDEX, BLOCK_SIZE=block_size, COMPUTE_GRAD=compute_grad, num_warps=num_warps,
        )
        # Tensors, not Python numbers: no host-device sync. All rows ignored gives nan, as torch.
        n_counted = (targets != IGNORE_INDEX).sum()
        if compute_grad:
            ctx.save_for_backward(grad, n_counted)
            ctx.backward_done = False
        return loss_rows.sum() / n_counted

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.backward_done:
            # The stored gradient was scaled in place by the first backward.
            raise RuntimeError("cross_entropy's backward can run once: retain_graph=True is not supported")
        ctx.backward_done = True
        grad, n_counted = ctx.saved_tensors
        # In place: a second (N, V) buffer is what this kernel exists to avoid.
        grad.mul_((grad_output / n_counted).to(grad.dtype))
        return grad, None, None, None, None


@torch.compiler.disable
def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    block_size: int,
    num_warps: int,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """Mean token cross entropy: logits (N, V) any float dtype, targets (N,) int64 -> fp32 scalar.

    As ``F.cross_entropy(logits.float(), targets)`` (targets of -100 are ignored, the mean is
    over the rest), in nats. When logits need a gradient it is computed in the forward.

    overwrite_logits=True stores that gradient in the logits' memory instead of a new (N, V)
    buffer (Liger-Kernel's saving: for GPT-2 that buffer is the largest activation). The
    logits hold garbage afterwards, so pass True only where the loss is their sole consumer:
    in cotune's GPT the logits are lm_head's output, which nothing else reads, and lm_head's
    backward needs its input and weight, not its output. Refused for a leaf tensor that
    requires grad (the caller owns those) and for non-contiguous logits; without a gradient
    (evaluation) nothing is written.
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            "logits (N, V) and targets (N,) must hold, but got "
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}"
        )
    if overwrite_logits and logits.requires_grad and (logits.is_leaf or not logits.is_contiguous()):
        raise ValueError(
            "overwrite_logits=True needs non-leaf, contiguous logits, but got "
            f"is_leaf={logits.is_leaf}, contiguous={logits.is_contiguous()}"
        )
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _CrossEntropy.apply(logits, targets.contiguous(), block_size, num_warps, overwrite_logits)
