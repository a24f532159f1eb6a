"""Linear + bias + GELU (tanh) as one Triton matmul, with a Triton backward.

y = gelu_tanh(x @ W.T + b): the first half of GPT-2's MLP. The forward fuses the bias add and
the GELU into the matmul's epilogue; the backward computes dpre = dy * gelu'(pre) (and the
bias gradient) in one tiled pass, then dx = dpre @ W and dW = dpre.T @ x with the same
matmul kernel. Every tile value is an argument: nothing here searches (no @triton.autotune).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# sqrt(2 / pi) and GPT-2's cubic coefficient of gelu_tanh(y) = 0.5 y (1 + tanh(c (y + a y^3))).
# constexpr: a @triton.jit function may only read globals that are.
_GELU_C = tl.constexpr(0.7978845608028654)
_GELU_A = tl.constexpr(0.044715)


@triton.jit
def _gelu_tanh(y):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh needed, and no cancellation near u = 0.
    u = _GELU_C * (y + _GELU_A * y * y * y)
    return y * tl.sigmoid(2.0 * u)


@triton.jit
def _gelu_tanh_grad(y):
    # d/dy of y * s with s = sigmoid(2u): s + y * 2 s (1 - s) * du/dy, du/dy = c (1 + 3a y^2).
    u = _GELU_C * (y + _GELU_A * y * y * y)
    s = tl.sigmoid(2.0 * u)
    return s + y * 2.0 * s * (1.0 - s) * _GELU_C * (1.0 + 3.0 * _GELU_A * y * y)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, pre_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BIAS_GELU: tl.constexpr,  # epilogue: pre = acc + bias stored to pre_ptr, c = gelu(pre)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32, as torch), None: the default
):
    """C (M, N) = A (M, K) @ B (K, N), any strides; fp32 accumulation, stored in C's dtype."""
    # Grouped ordering (Triton's matmul tutorial): consecutive programs sweep GROUP_M rows of
    # tiles column by column, so the A rows they share are still in L2 when reused.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # Masked lanes load 0, which adds nothing to the dot: edges need no special case.
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if BIAS_GELU:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        pre = acc + bias[None, :]
        # pre is rounded to the input dtype before it is saved, as eager torch saves it.
        tl.store(pre_ptr + c_offs, pre.to(pre_ptr.dtype.element_ty), mask=c_mask)
        acc = _gelu_tanh(pre)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _gelu_backward_kernel(
    dy_ptr, pre_ptr, dpre_ptr, dbias_partial_ptr, M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dpre (M, N) = dy * gelu'(pre); dbias_partial[pid_m, :] = column sums of this tile row (fp32).

    dy, pre, dpre contiguous (M, N). Fusing the bias reduction here reads dpre's inputs once.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m[:, None] * N + offs_n[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dpre = dy * _gelu_tanh_grad(pre)  # masked lanes: 0 * gelu'(0) = 0
    tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_partial_ptr + pid_m * N + offs_n, tl.sum(dpre, axis=0), mask=offs_n < N)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, tiles: dict, **epilogue) -> torch.Tensor:
    """out (M, N) = a (M, K) @ b (K, N) with the given tiles; a and b may be transposed views."""
    M, K = a.shape
    N = b.shape[1]
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, b, out, epilogue.get("bias", out), epilogue.get("pre", out),
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        BIAS_GELU="bias" in epilogue,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else None,
        **tiles,
    )
    return out


class _LinearBiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tiles: dict) -> torch.Tensor:
        M, N = x2.shape[0], weight.shape[0]
        out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
        # The backward needs gelu'(pre). We save pre (M, N) rather than recompute it: that is
        # a whole matmul less in the backward, and costs no more memory than eager torch,
        # whose GELU saves the same pre-activation. The output itself is not saved.
        pre = torch.empty_like(out)
        _matmul(x2, weight.t(), out, tiles, bias=bias, pre=pre)  # weight.t(): (K, N) view, no copy
        ctx.save_for_backward(x2, weight, pre)
        ctx.tiles = tiles
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, pre = ctx.saved_tensors
        tiles = ctx.tiles
        dy = dy.contiguous()
        M, N = pre.shape
        dpre = torch.empty_like(pre)
        grid_m = triton.cdiv(M, tiles["BLOCK_M"])
        dbias_partial = torch.empty((grid_m, N), device=pre.device, dtype=torch.float32)
        _gelu_backward_kernel[(grid_m, triton.cdiv(N, tiles["BLOCK_N"]))](
            dy, pre, dpre, dbias_partial, M, N,
            BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], num_warps=tiles["num_warps"],
        )
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = _matmul(dpre, weight, torch.empty_like(x2), tiles)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            dweight = _matmul(dpre.t(), x2, torch.empty_like(weight), tiles)  # (N, M) @ (M, K)
        if ctx.needs_input_grad[2]:
            dbias = dbias_partial.sum(0).to(pre.dtype)
        return dx, dweight, dbias, None


@torch.compiler.disable
def linear_bias_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias): x (..., K), weight (N, K) as nn.Linear, bias (N,) -> (..., N).

    Computed in fp32, returned in x's dtype; weight and bias are cast to it first (as autocast
    would), so their gradients flow back in their own dtype.
    """
    K = x.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != K or bias.shape != (weight.shape[0],):
        raise ValueError(
            "weight (N, K) and bias (N,) with K == x.shape[-1] must hold, but got "
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )
    tiles = {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
        "num_warps": num_warps, "num_stages": num_stages,
    }
    x2 = x.reshape(-1, K).contiguous()
    out = _LinearBiasGelu.apply(x2, weight.to(x.dtype), bias.to(x.dtype), tiles)
    return out.view(*x.shape[:-1], weight.shape[0])
