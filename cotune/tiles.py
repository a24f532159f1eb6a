"""Tile values of cotune's Triton kernels and the rules that say which ones can run.

Pure Python on purpose: the search side imports this module to reject a config before
launching it, and the search side never imports torch or triton (DESIGN.md, house style).
The trial side reads a config's tiles and shapes through it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from cotune.config import KernelConfig, TrialConfig

# Triton refuses any block tensor with more elements than this (triton.TRITON_MAX_TENSOR_NUMEL).
MAX_TENSOR_NUMEL = 1 << 20
# tl.dot's smallest tile on every NVIDIA generation Triton targets (mma m16n8k16 and wider).
MIN_DOT_BLOCK = 16
MAX_NUM_WARPS = 32  # 1024 threads per program: CUDA's limit per block

_SHAPE_KEYS = {"mlp": ("M", "N", "K"), "cross_entropy": ("N", "V"), "layernorm": ("M", "C")}


@dataclass(frozen=True)
class MatmulTiles:
    """Tiles of the fused linear + bias + GELU matmul (and its two backward matmuls)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int  # rows of output tiles visited together, so their A tiles stay in L2
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop (shared-memory buffers)


@dataclass(frozen=True)
class RowTiles:
    """Tiles of a row kernel (cross entropy, layer norm): one program per row, BLOCK_SIZE columns at a time."""

    block_size: int
    num_warps: int


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _is_power_of_2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def infeasible_reason(
    kernel: str,
    tiles: MatmulTiles | RowTiles,
    shape: dict[str, int],
    dtype_bytes: int,
    shared_memory_bytes: int | None,
) -> str:
    """Why ``tiles`` cannot (or must not) run ``kernel`` at ``shape``; "" when they can.

    kernel: "mlp" (tiles a MatmulTiles, shape {"M", "N", "K"}), "cross_entropy" (RowTiles,
    {"N", "V"}) or "layernorm" (RowTiles, {"M", "C"}). dtype_bytes: bytes per element of the
    inputs (2 for bf16). shared_memory_bytes: the device's shared memory per block, or None
    (CPU: the interpreter has no such limit). The shared-memory rule is a conservative
    estimate; the compiler's own OutOfResources (see :func:`is_out_of_resources`) is the judge.
    A wrong kernel name, tiles type or shape key is a bug and raises ValueError.
    """
    if kernel not in _SHAPE_KEYS:
        raise ValueError(f"kernel must be one of {sorted(_SHAPE_KEYS)}, but got kernel={kernel!r}")
    expected_type = MatmulTiles if kernel == "mlp" else RowTiles
    if not isinstance(tiles, expected_type):
        raise ValueError(
            f"kernel={kernel!r} takes {expected_type.__name__}, but got {type(tiles).__name__}"
        )
    if set(shape) != set(_SHAPE_KEYS[kernel]):
        raise ValueError(
            f"shape keys must be {list(_SHAPE_KEYS[kernel])} for kernel={kernel!r}, but got {sorted(shape)}"
        )

    if isinstance(tiles, MatmulTiles):
        blocks = {"BLOCK_M": (tiles.block_m, "M"), "BLOCK_N": (tiles.block_n, "N"), "BLOCK_K": (tiles.block_k, "K")}
    else:
        blocks = {"BLOCK_SIZE": (tiles.block_size, _SHAPE_KEYS[kernel][1])}

    # Block shapes are tl.arange extents: Triton only builds power-of-two ranges.
    for name, (block, _) in blocks.items():
        if not _is_power_of_2(block):
            return f"{name} must be a power of two, but got {name}={block}"
    if not (_is_power_of_2(tiles.num_warps) and tiles.num_warps <= MAX_NUM_WARPS):
        return f"num_warps must be a power of two in 1..{MAX_NUM_WARPS}, but got num_warps={tiles.num_warps}"

    if isinstance(tiles, MatmulTiles):
        for name, (block, _) in blocks.items():
            if block < MIN_DOT_BLOCK:
                return f"{name} >= {MIN_DOT_BLOCK} must hold (tl.dot's smallest tile), but got {name}={block}"
        if tiles.group_m < 1:
            return f"GROUP_M >= 1 must hold, but got GROUP_M={tiles.group_m}"
        if tiles.num_stages < 1:
            return f"num_stages >= 1 must hold, but got num_stages={tiles.num_stages}"
        if tiles.block_m * tiles.block_n > MAX_TENSOR_NUMEL:
            return (
                f"BLOCK_M * BLOCK_N <= {MAX_TENSOR_NUMEL} must hold (Triton's largest tensor), "
                f"but got BLOCK_M={tiles.block_m}, BLOCK_N={tiles.block_n}"
            )
    elif tiles.block_size > MAX_TENSOR_NUMEL:
        return (
            f"BLOCK_SIZE <= {MAX_TENSOR_NUMEL} must hold (Triton's largest tensor), "
            f"but got BLOCK_SIZE={tiles.block_size}"
        )

    # A block wider than its (rounded-up) dimension only computes masked-out lanes: it runs,
    # but it is the same work as a smaller block and more registers, so never worth a trial.
    for name, (block, dim) in blocks.items():
        if block > next_power_of_2(shape[dim]):
            return f"{name} <= next_power_of_2({dim}) must hold, but got {name}={block}, {dim}={shape[dim]}"

    if isinstance(tiles, MatmulTiles) and shared_memory_bytes is not None:
        # Each pipeline stage buffers one A tile (BLOCK_M x BLOCK_K) and one B tile (BLOCK_K x BLOCK_N).
        needed = tiles.num_stages * (tiles.block_m * tiles.block_k + tiles.block_k * tiles.block_n) * dtype_bytes
        if needed > shared_memory_bytes:
            return (
                f"num_stages * (BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) * dtype_bytes <= shared_memory_bytes must hold, "
                f"but got num_stages={tiles.num_stages}, BLOCK_M={tiles.block_m}, BLOCK_N={tiles.block_n}, "
                f"BLOCK_K={tiles.block_k}, dtype_bytes={dtype_bytes}: {needed} > {shared_memory_bytes}"
            )
    return ""


def is_out_of_resources(exc: BaseException) -> bool:
    """Whether ``exc`` is Triton saying a config does not fit the device (shared memory, registers).

    Recognised by type name and message, so that this module needs no triton import:
    ``triton.runtime.errors.OutOfResources`` ("out of resource: shared memory, Required: ...").
    Such a config is infeasible, not a crash. Causes chained with ``raise ... from`` count too.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(cls.__name__ == "OutOfResources" for cls in type(current).__mro__):
            return True
        if "out of resource" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def kernel_shapes(config: TrialConfig) -> dict[str, dict[str, int]]:
    """The shapes each kernel sees in one (pipeline) microbatch forward, by the tile rules' names."""
    w, b, par = config.workload, config.batch, config.parallel
    rows = -(-b.micro_batch_size // (par.pp_microbatches if par.pp > 1 else 1)) * w.seq_len  # tokens
    return {"mlp": {"M": rows, "N": 4 * w.n_embd // par.tp, "K": w.n_embd},
            "cross_entropy": {"N": rows, "V": w.vocab_size}, "layernorm": {"M": rows, "C": w.n_embd}}


def kernel_tiles(k: KernelConfig, kernel: str) -> MatmulTiles | RowTiles:
    """One kernel's tile values from the config, as the kernels and the tile rules take them."""
    if kernel == "mlp":
        return MatmulTiles(k.mlp_block_m, k.mlp_block_n, k.mlp_block_k, k.mlp_group_m,
                           k.mlp_num_warps, k.mlp_num_stages)
    prefix = {"cross_entropy": "ce", "layernorm": "ln"}[kernel]
    return RowTiles(getattr(k, f"{prefix}_block_size"), getattr(k, f"{prefix}_num_warps"))
