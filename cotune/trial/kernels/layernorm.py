"""LayerNorm over the last dimension, forward and backward in Triton, fp32 math.

One program per row in the forward; the row is read in BLOCK_SIZE chunks, so any power of
two works, also one smaller than C. The backward gives each program a strided set of rows
and a private fp32 row of partial weight/bias gradients, summed in torch afterwards: no
atomics, so the result does not depend on scheduling. After Triton's layer-norm tutorial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    stride_row, C, eps,
    BLOCK_SIZE: tl.constexpr,
):
    """y[row] = (x[row] - mean) * rstd * w + b; mean[row], rstd[row] stored in fp32."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * stride_row
    y_ptr += row * stride_row
    cols = tl.arange(0, BLOCK_SIZE)

    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for start in range(0, C, BLOCK_SIZE):
        offs = start + cols
        acc += tl.load(x_ptr + offs, mask=offs < C, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / C
    # Variance from a second pass over (x - mean)^2, not E[x^2] - mean^2, which cancels
    # catastrophically when |mean| >> std.
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for start in range(0, C, BLOCK_SIZE):
        offs = start + cols
        mask = offs < C
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        diff = tl.where(mask, x - mean, 0.0)
        acc += diff * diff
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)

    for start in range(0, C, BLOCK_SIZE):
        offs = start + cols
        mask = offs < C
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, dw_partial_ptr, db_partial_ptr,
    stride_row, M, C,
    BLOCK_SIZE: tl.constexpr,
):
    """dx for rows pid, pid + P, pid + 2P, ... (P programs); dw/db of those rows summed into
    this program's row of dw_partial / db_partial (P, C), fp32. x, dy, dx share stride_row."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    dw_partial_ptr += pid * C
    db_partial_ptr += pid * C
    for row in range(pid, M, num_programs):
        row_offset = tl.cast(row, tl.int64) * stride_row  # int64: M * C may pass 2^31
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        # With xhat = (x - mean) * rstd and g = w * dy:
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). Pass 1 takes the two row means.
        sum_g = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        sum_g_xhat = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        for start in range(0, C, BLOCK_SIZE):
            offs = start + cols
            mask = offs < C
            x = tl.load(x_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = w * dy  # 0 on masked lanes: w and dy load 0 there
            sum_g += g
            sum_g_xhat += g * xhat
        mean_g = tl.sum(sum_g, axis=0) / C
        mean_g_xhat = tl.sum(sum_g_xhat, axis=0) / C
        # Pass 2 writes dx and adds this row's dw = dy * xhat, db = dy to the program's partials.
        for start in range(0, C, BLOCK_SIZE):
            offs = start + cols
            mask = offs < C
            x = tl.load(x_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            dx = (w * dy - mean_g - xhat * mean_g_xhat) * rstd
            tl.store(dx_ptr + row_offset + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            # Only this program touches its partial row, so read-add-write needs no atomics.
            dw = tl.load(dw_partial_ptr + offs, mask=mask, other=0.0)
            tl.store(dw_partial_ptr + offs, dw + dy * xhat, mask=mask)
            db = tl.load(db_partial_ptr + offs, mask=mask, other=0.0)
            tl.store(db_partial_ptr + offs, db + dy, mask=mask)


def _backward_programs(device: torch.device, M: int) -> int:
    """How many programs share the backward's rows: a few per SM on GPU keeps every SM busy
    while bounding the (programs, C) partial buffers; on CPU (the interpreter) a few suffice."""
    if device.type == "cuda":
        return min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(M, 8)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                block_size: int, num_warps: int) -> torch.Tensor:
        M, C = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(M, device=x2.device, dtype=torch.float32)
        rstd = torch.empty(M, device=x2.device, dtype=torch.float32)
        _layer_norm_forward_kernel[(M,)](
            x2, y, weight, bias, mean, rstd, x2.stride(0), C, eps,
            BLOCK_SIZE=block_size, num_warps=num_warps,
        )
        # Saved: the input (which eager LayerNorm saves too) and two fp32 numbers per row.
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.block_size, ctx.num_warps = block_size, num_warps
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, C = x2.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x2)
        programs = _backward_programs(x2.device, M)
        dw_partial = torch.zeros((programs, C), device=x2.device, dtype=torch.float32)
        db_partial = torch.zeros((programs, C), device=x2.device, dtype=torch.float32)
        _layer_norm_backward_kernel[(programs,)](
            x2, dy, dx, weight, mean, rstd, dw_partial, db_partial, x2.stride(0), M, C,
            BLOCK_SIZE=ctx.block_size, num_warps=ctx.num_warps,
        )
        dweight = dw_partial.sum(0).to(weight.dtype)
        dbias = db_partial.sum(0).to(weight.dtype)
        return dx, dweight, dbias, None, None, None


@torch.compiler.disable
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    block_size: int,
    num_warps: int,
) -> torch.Tensor:
    """As ``F.layer_norm(x, (C,), weight, bias, eps)``: x (..., C), weight and bias (C,) -> (..., C).

    Statistics and arithmetic in fp32; the output in x's dtype, the gradients of weight and
    bias in theirs.
    """
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(
            "weight and bias of shape (C,) with C == x.shape[-1] must hold, but got "
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )
    x2 = x.reshape(-1, C).contiguous()
    y = _LayerNorm.apply(x2, weight.contiguous(), bias.contiguous(), eps, block_size, num_warps)
    return y.view(x.shape)
