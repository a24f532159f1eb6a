"""cotune.trial.kernels against PyTorch: forward outputs and gradients, in Triton's CPU interpreter
(TRITON_INTERPRET=1, set by conftest before triton is imported); and the tile rules of cotune.tiles.

Every tile config the shipped search spaces can choose (plus a fixed fallback list) runs at
shapes that are not multiples of its blocks, so the edge masks are exercised. num_warps and
num_stages only schedule work on a GPU; the interpreter runs each program sequentially in
numpy and ignores them, so the first shipped value is passed and not parametrized.

Tolerance: max|got - want| <= TOL[dtype] * max|want| per tensor, `want` the fp32 PyTorch
reference computed from the same input values. Relative to the tensor's largest value, not
per element, because a matmul's rounding error scales with the size of its sums, not with the
(possibly tiny) element that ends up holding it. Measured on this interpreter (triton 3.9):
  fp32  tol 1e-5,  measured <= 5e-7 (summation order only: tl.dot runs as a full-precision
        numpy matmul; the largest absolute error, 4e-5, is on a weight gradient of size 79)
  fp16  tol 2e-3,  measured <= 4e-4 (fp16's unit roundoff is 2^-11 = 4.9e-4)
  bf16  tol 2e-2,  measured <= 9e-3 (up to three roundings at bf16's unit roundoff 2^-8 = 3.9e-3:
        cross entropy's stored gradient, its scale, their product)
bf16 is not tested for the matmul: the interpreter's tl.dot multiplies bf16 tiles as their raw
uint16 bit patterns (triton 3.9 InterpreterBuilder.create_dot), so its results are garbage on
CPU. fp16 goes through the same kernel code (only the element type differs) and is tested instead.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from cotune import tiles as tiles_module
from cotune.tiles import MatmulTiles, RowTiles, infeasible_reason, is_out_of_resources
from cotune.trial.kernels.cross_entropy import cross_entropy
from cotune.trial.kernels.layernorm import layer_norm
from cotune.trial.kernels.mlp import linear_bias_gelu

ROOT = Path(__file__).resolve().parent.parent
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def shipped_tile_configs() -> dict:
    """The kernel tile configs the shipped spaces in search_spaces/ can choose.

    "mlp": (block_m, block_n, block_k, group_m) of each space's cartesian product, merged;
    "ce_block_size", "ln_block_size": every value any space lists; the warp and stage counts
    (the first value found, see the module docstring).
    """
    mlp, found = set(), {}
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        knobs = yaml.safe_load(path.read_text()).get("knobs") or {}
        choices = {n: d["choices"] for n, d in knobs.items() if isinstance(d, dict) and "choices" in d}
        axes = [choices.get(f"mlp_{k}", []) for k in ("block_m", "block_n", "block_k", "group_m")]
        mlp |= set(itertools.product(*axes)) if all(axes) else set()
        for name, values in choices.items():
            found.setdefault(name, [])
            found[name] += [v for v in values if v not in found[name]]
    return {
        "mlp": sorted(mlp),
        "mlp_num_warps": found.get("mlp_num_warps", [None])[0],
        "mlp_num_stages": found.get("mlp_num_stages", [None])[0],
        "ce_block_size": found.get("ce_block_size", []),
        "ce_num_warps": found.get("ce_num_warps", [None])[0],
        "ln_block_size": found.get("ln_block_size", []),
        "ln_num_warps": found.get("ln_num_warps", [None])[0],
    }


SHIPPED = shipped_tile_configs()
assert SHIPPED["mlp"] and SHIPPED["ce_block_size"] and SHIPPED["ln_block_size"], "the shipped spaces tune no tiles"
# Always tested besides the shipped ones: a CE block narrower than V=1000 and one wider; LN
# blocks narrower and wider than C=96.
MLP_CONFIGS = SHIPPED["mlp"]
CE_BLOCK_SIZES = sorted({256, 1024} | set(SHIPPED["ce_block_size"]))
LN_BLOCK_SIZES = sorted({32, 128} | set(SHIPPED["ln_block_size"]))
MLP_WARPS_STAGES = {"num_warps": SHIPPED["mlp_num_warps"] or 4, "num_stages": SHIPPED["mlp_num_stages"] or 3}
CE_WARPS = SHIPPED["ce_num_warps"] or 8
LN_WARPS = SHIPPED["ln_num_warps"] or 4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """max|actual - expected| <= TOL[dtype] * max|expected| (see the module docstring)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert error <= TOL[dtype] * scale, f"{what}: max error {error:.3g} > {TOL[dtype]} * max|expected| {scale:.3g}"


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


# ---------------------------------------------------------------- linear + bias + GELU


def mlp_case(shape: tuple[int, ...], N: int, dtype: torch.dtype, tiles: dict) -> None:
    """linear_bias_gelu vs F.gelu(F.linear(...), approximate="tanh"): output and all three gradients."""
    torch.manual_seed(0)
    K = shape[-1]
    x = torch.randn(shape).to(dtype)
    weight = (torch.randn(N, K) / K**0.5).to(dtype)
    bias = torch.randn(N).to(dtype)
    x1, w1, b1 = leaves(x, weight, bias)
    y = linear_bias_gelu(x1, w1, b1, **tiles)
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    x2, w2, b2 = leaves(x.float(), weight.float(), bias.float())
    ref = F.gelu(F.linear(x2, w2, b2), approximate="tanh")
    ref.backward(dy.float())
    assert y.shape == (*shape[:-1], N) and y.dtype == dtype
    for name, got, want in [("y", y, ref), ("dx", x1.grad, x2.grad), ("dweight", w1.grad, w2.grad),
                            ("dbias", b1.grad, b2.grad)]:
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("block_m, block_n, block_k, group_m", MLP_CONFIGS)
def test_linear_bias_gelu_matches_torch_for_every_tile_config(block_m, block_n, block_k, group_m):
    # Every dimension spans two full blocks and a ragged edge (M three tiles deep, so GROUP_M
    # orders a partial group): masks, the K loop and the grouped order are all exercised,
    # at a cost the interpreter bounds by tile count, not by a fixed large shape.
    M, N, K = 3 * block_m - 5, 2 * block_n - 3, 2 * block_k + 5
    tiles = {"block_m": block_m, "block_n": block_n, "block_k": block_k, "group_m": group_m, **MLP_WARPS_STAGES}
    mlp_case((M, K), N, torch.float32, tiles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_bias_gelu_leading_dims_and_several_groups(dtype):
    # (2, 80, 96) -> M=160 rows; 32-row tiles give 5 tile rows, so GROUP_M=2 makes 3 groups
    # (the last one partial). N=192 and K=96 are not multiples of BLOCK_N=128 / BLOCK_K=64.
    tiles = {"block_m": 32, "block_n": 128, "block_k": 64, "group_m": 2, **MLP_WARPS_STAGES}
    mlp_case((2, 80, 96), 192, dtype, tiles)


def test_linear_bias_gelu_casts_weight_to_the_input_dtype_and_rejects_bad_shapes():
    x = torch.randn(5, 16, dtype=torch.float16, requires_grad=True)
    weight = (torch.randn(24, 16) / 4).requires_grad_()  # fp32 master weight, fp16 activations
    bias = torch.randn(24, requires_grad=True)
    tiles = {"block_m": 16, "block_n": 32, "block_k": 16, "group_m": 1, **MLP_WARPS_STAGES}
    y = linear_bias_gelu(x, weight, bias, **tiles)
    y.sum().backward()
    assert y.dtype == torch.float16 and weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="K == x.shape"):
        linear_bias_gelu(x, weight[:, :8], bias, **tiles)


# ---------------------------------------------------------------- cross entropy


def ce_case(dtype: torch.dtype, block_size: int, overwrite_logits: bool = False) -> None:
    torch.manual_seed(0)
    N, V = 37, 1000
    logits = (3 * torch.randn(N, V)).to(dtype)
    targets = torch.randint(0, V, (N,))
    targets[[3, 17]] = -100  # ignored rows: no loss, no gradient, not counted in the mean
    leaf, = leaves(logits)
    # A non-leaf (as lm_head's output is) so that overwrite_logits may reuse its memory.
    loss = cross_entropy(leaf * 1, targets, block_size=block_size, num_warps=CE_WARPS,
                                 overwrite_logits=overwrite_logits)
    (2.5 * loss).backward()  # a grad_output other than 1 must scale the stored gradient
    ref_leaf, = leaves(logits.float())
    ref = F.cross_entropy(ref_leaf, targets)
    (2.5 * ref).backward()
    assert loss.shape == () and loss.dtype == torch.float32
    # The loss is fp32 math on the same input values, for every input dtype.
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(leaf.grad, ref_leaf.grad, dtype, "dlogits")
    assert leaf.grad[[3, 17]].abs().max() == 0


@pytest.mark.parametrize("block_size", CE_BLOCK_SIZES)
def test_cross_entropy_matches_torch_for_every_block_size(block_size):
    ce_case(torch.float32, block_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_low_precision_with_gradient_over_the_logits(dtype):
    ce_case(dtype, 256, overwrite_logits=True)


def test_cross_entropy_overwrite_reuses_the_logits_memory_and_guards_its_misuse():
    torch.manual_seed(0)
    leaf = torch.randn(9, 100, requires_grad=True)
    targets = torch.randint(0, 100, (9,))
    logits = leaf * 1
    loss = cross_entropy(logits, targets, block_size=64, num_warps=CE_WARPS, overwrite_logits=True)
    # The gradient now lives in the logits, not yet scaled by grad_output / N (the backward does that).
    expected = torch.softmax(leaf.detach(), -1) - F.one_hot(targets, 100)
    assert_close(logits.detach(), expected, torch.float32, "stored gradient")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run once"):
        loss.backward()
    # Logits another node saved for its backward: the overwrite makes that backward fail, loudly.
    logits = leaf * 1
    saved_by_sin = logits.sin()  # sin saves its input for its backward
    cross_entropy(logits, targets, block_size=64, num_warps=CE_WARPS, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_by_sin.sum().backward()
    with pytest.raises(ValueError, match="non-leaf"):
        cross_entropy(leaf, targets, block_size=64, num_warps=CE_WARPS, overwrite_logits=True)


def test_cross_entropy_without_gradient_leaves_the_logits_alone():
    torch.manual_seed(0)
    logits = torch.randn(9, 100)
    before = logits.clone()
    targets = torch.randint(0, 100, (9,))
    loss = cross_entropy(logits, targets, block_size=64, num_warps=CE_WARPS, overwrite_logits=True)
    assert_close(loss, F.cross_entropy(before, targets), torch.float32, "loss")
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- layer norm


def ln_case(dtype: torch.dtype, block_size: int) -> None:
    torch.manual_seed(0)
    C = 96
    x = (2 * torch.randn(3, 11, C) + 1).to(dtype)  # M=33 rows, a mean far from 0
    weight = (1 + 0.1 * torch.randn(C)).to(dtype)
    bias = (0.1 * torch.randn(C)).to(dtype)
    x1, w1, b1 = leaves(x, weight, bias)
    y = layer_norm(x1, w1, b1, 1e-5, block_size=block_size, num_warps=LN_WARPS)
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    x2, w2, b2 = leaves(x.float(), weight.float(), bias.float())
    ref = F.layer_norm(x2, (C,), w2, b2, 1e-5)
    ref.backward(dy.float())
    assert y.shape == x.shape and y.dtype == dtype
    for name, got, want in [("y", y, ref), ("dx", x1.grad, x2.grad), ("dweight", w1.grad, w2.grad),
                            ("dbias", b1.grad, b2.grad)]:
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("block_size", LN_BLOCK_SIZES)
def test_layer_norm_matches_torch_for_every_block_size(block_size):
    # 32 < C=96 < 128: several chunks per row, and one chunk wider than the row.
    ln_case(torch.float32, block_size)


def test_layer_norm_bf16():
    ln_case(torch.bfloat16, 64)


# ---------------------------------------------------------------- tiles: feasibility rules

GOOD_MLP = MatmulTiles(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)
MLP_SHAPE = {"M": 4096, "N": 3072, "K": 768}


@pytest.mark.parametrize(
    "kernel, tiles, shape, smem, expected",
    [
        ("mlp", GOOD_MLP, MLP_SHAPE, 232448, ""),
        ("mlp", MatmulTiles(48, 64, 32, 8, 4, 3), MLP_SHAPE, None, "BLOCK_M must be a power of two, but got BLOCK_M=48"),
        ("mlp", MatmulTiles(64, 64, 32, 8, 3, 3), MLP_SHAPE, None, "num_warps must be a power of two in 1..32, but got num_warps=3"),
        ("mlp", MatmulTiles(64, 64, 32, 8, 64, 3), MLP_SHAPE, None, "num_warps must be a power of two in 1..32, but got num_warps=64"),
        ("mlp", MatmulTiles(64, 64, 8, 8, 4, 3), MLP_SHAPE, None, "BLOCK_K >= 16 must hold (tl.dot's smallest tile), but got BLOCK_K=8"),
        ("mlp", MatmulTiles(64, 64, 32, 8, 4, 0), MLP_SHAPE, None, "num_stages >= 1 must hold, but got num_stages=0"),
        ("mlp", MatmulTiles(64, 64, 32, 0, 4, 3), MLP_SHAPE, None, "GROUP_M >= 1 must hold, but got GROUP_M=0"),
        ("mlp", MatmulTiles(128, 64, 32, 8, 4, 3), {"M": 64, "N": 3072, "K": 768}, None,
         "BLOCK_M <= next_power_of_2(M) must hold, but got BLOCK_M=128, M=64"),
        ("mlp", MatmulTiles(64, 64, 32, 8, 4, 3), {"M": 33, "N": 3072, "K": 768}, None, ""),  # next_pow2(33) = 64
        # 4 * (128*64 + 64*256) * 2 = 196608 bytes: fits an H100's 232448, not an A10's 101376.
        ("mlp", MatmulTiles(128, 256, 64, 8, 8, 4), MLP_SHAPE, 232448, ""),
        ("mlp", MatmulTiles(128, 256, 64, 8, 8, 4), MLP_SHAPE, 101376,
         "num_stages * (BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) * dtype_bytes <= shared_memory_bytes must hold, but got "
         "num_stages=4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, dtype_bytes=2: 196608 > 101376"),
        ("mlp", MatmulTiles(128, 256, 64, 8, 8, 4), MLP_SHAPE, None, ""),  # CPU: no shared memory rule
        ("cross_entropy", RowTiles(4096, 8), {"N": 8192, "V": 50304}, None, ""),
        ("cross_entropy", RowTiles(1000, 8), {"N": 8192, "V": 50304}, None, "BLOCK_SIZE must be a power of two, but got BLOCK_SIZE=1000"),
        ("cross_entropy", RowTiles(1024, 8), {"N": 8192, "V": 256}, None,
         "BLOCK_SIZE <= next_power_of_2(V) must hold, but got BLOCK_SIZE=1024, V=256"),
        ("layernorm", RowTiles(1024, 4), {"M": 8192, "C": 768}, None, ""),
        ("layernorm", RowTiles(2048, 4), {"M": 8192, "C": 768}, None,
         "BLOCK_SIZE <= next_power_of_2(C) must hold, but got BLOCK_SIZE=2048, C=768"),
        ("layernorm", RowTiles(1 << 21, 4), {"M": 8192, "C": 1 << 22}, None, "BLOCK_SIZE <= 1048576 must hold"),
        ("layernorm", RowTiles(256, 0), {"M": 8192, "C": 768}, None, "num_warps must be a power of two"),
    ],
)
def test_infeasible_reason(kernel, tiles, shape, smem, expected):
    reason = infeasible_reason(kernel, tiles, shape, dtype_bytes=2, shared_memory_bytes=smem)
    if expected:
        assert expected in reason
        assert reason.count(". ") == 0 and "\n" not in reason  # one sentence
    else:
        assert reason == ""


def test_infeasible_reason_shared_memory_boundary():
    # 3 * (64*32 + 32*64) * 2 = 24576 bytes: fits exactly, one byte less does not.
    assert infeasible_reason("mlp", GOOD_MLP, MLP_SHAPE, 2, 24576) == ""
    assert "24576 > 24575" in infeasible_reason("mlp", GOOD_MLP, MLP_SHAPE, 2, 24575)


def test_infeasible_reason_rejects_caller_bugs():
    with pytest.raises(ValueError, match="kernel must be one of"):
        infeasible_reason("softmax", GOOD_MLP, MLP_SHAPE, 2, None)
    with pytest.raises(ValueError, match="takes RowTiles"):
        infeasible_reason("layernorm", GOOD_MLP, {"M": 1, "C": 1}, 2, None)
    with pytest.raises(ValueError, match="shape keys"):
        infeasible_reason("mlp", GOOD_MLP, {"M": 1, "N": 1}, 2, None)


def test_is_out_of_resources():
    from triton.runtime.errors import OutOfResources

    assert is_out_of_resources(OutOfResources(232448, 101376, "shared memory"))
    assert is_out_of_resources(RuntimeError("out of resource: shared memory, Required: 1, Hardware limit: 0"))
    try:  # wrapped, as a launcher might re-raise it
        try:
            raise OutOfResources(1, 0, "shared memory")
        except OutOfResources as exc:
            raise RuntimeError("trial failed") from exc
    except RuntimeError as wrapped:
        assert is_out_of_resources(wrapped)
    assert not is_out_of_resources(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_resources(ValueError("bad value"))


def test_tiles_module_imports_neither_torch_nor_triton():
    code = (
        "import sys, cotune.tiles, cotune.derive; "
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert tiles_module.next_power_of_2(33) == 64 and tiles_module.next_power_of_2(64) == 64


# ---------------------------------------------------------------- in training, end to end

TRITON_SPACE = ROOT / "search_spaces" / "cpu-triton-tiny.yaml"


def triton_config(**kernels_override):
    """A cpu-triton-tiny trial with all three kernels in Triton (the space's first tile choices)."""
    from cotune import derive
    from cotune.space import load_space

    space = load_space(TRITON_SPACE)
    knobs = {name: domain.values()[0] for name, domain in space.knobs.items()}
    knobs.update(learning_rate=3e-3, cross_entropy_kernel="triton", **kernels_override)
    config, reason = derive.build_config(space, knobs, world_size=1, vocab_size=258)
    assert reason == ""
    return config


@pytest.mark.slow
def test_a_search_with_triton_kernels_completes_and_records_their_timings(tmp_path):
    import optuna

    from tests.conftest import run_cli

    out = run_cli("search", "--space", str(TRITON_SPACE), "--budget", "1", "--seed", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    study = optuna.load_study(study_name="cpu-triton-tiny", storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    (trial,) = study.trials
    assert trial.user_attrs["status"] == "ok", trial.user_attrs["reason"] + trial.user_attrs["error_tail"]
    timings = trial.user_attrs["kernel_timings"]
    selected = [k for k in ("mlp", "cross_entropy", "layernorm") if trial.user_attrs["config"]["kernels"][k] == "triton"]
    assert [t["kernel"] for t in timings] == selected and "mlp" in selected
    assert all(t["triton_ms"] > 0 and t["torch_ms"] > 0 and not t["cached"] for t in timings)
    cache = tmp_path / "cotune-runs" / "cpu-triton-tiny" / "kernel-timings.json"
    assert len(json.loads(cache.read_text())) == len(selected)

    out = run_cli("report", "-o", "report.html", cwd=tmp_path)  # the report shows each kernel's timing
    assert out.returncode == 0, out.stdout + out.stderr
    html = (tmp_path / "report.html").read_text()
    section = html[html.index('<section id="kernels">'):]
    section = section[:section.index("</section>")]
    assert section.count("<tr>") == 1 + len(selected)  # the header and one row per kernel
    assert "CPU interpreter: they show the path works" in section
    assert all(f"<td>{k}</td>" in section for k in selected)


@pytest.mark.slow
def test_triton_kernels_train_as_pytorch_does_and_reuse_measured_timings(tmp_path):
    """The same trial with every kernel in Triton and with none: the same loss at every step,
    since the kernels replace PyTorch's ops exactly (to fp32 rounding). A second run with the
    same tiles and shapes takes its kernel timings from the study's cache."""
    from dataclasses import replace

    from cotune import runner
    from cotune.config import KernelConfig
    from cotune.data import default_cache_dir

    config = triton_config()
    assert config.kernels.selected() == ["mlp", "cross_entropy", "layernorm"]
    cache = tmp_path / "kernel-timings.json"
    with_triton = runner.launch_trial(config, tmp_path / "triton", cache_dir=default_cache_dir(), kernel_cache=cache)
    assert with_triton.status == "ok", with_triton.reason + with_triton.error_tail
    plain = runner.launch_trial(replace(config, kernels=KernelConfig()), tmp_path / "torch", cache_dir=default_cache_dir())
    assert plain.status == "ok" and plain.kernel_timings == []
    got, want = ([step[2] for step in r.loss_curve] for r in (with_triton, plain))
    assert len(got) == 8 and got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert with_triton.metrics["val_loss"] == pytest.approx(plain.metrics["val_loss"], rel=1e-5)
    assert not any(t["cached"] for t in with_triton.kernel_timings)

    again = runner.launch_trial(config, tmp_path / "again", cache_dir=default_cache_dir(), kernel_cache=cache)
    assert again.status == "ok" and [t["cached"] for t in again.kernel_timings] == [True, True, True]
    assert [t["triton_ms"] for t in again.kernel_timings] == [t["triton_ms"] for t in with_triton.kernel_timings]
    assert again.phase_seconds["kernel_timing"] < with_triton.phase_seconds["kernel_timing"] / 5


def test_timing_cache_key_covers_the_kernel_source_and_cotune_and_times_the_training_path():
    import hashlib

    from cotune import __version__
    from cotune.trial.kernels import timing

    for kernel, module in (("mlp", "mlp.py"), ("cross_entropy", "cross_entropy.py"), ("layernorm", "layernorm.py")):
        source = (ROOT / "cotune" / "trial" / "kernels" / module).read_bytes()
        assert timing.source_hash(kernel) == hashlib.sha256(source).hexdigest()[:16]
    config = triton_config()
    records = timing.time_kernels(config, torch.device("cpu"), None)
    assert all(r["source"] == timing.source_hash(r["kernel"]) and r["cotune"] == __version__ for r in records)
    # The cross-entropy is timed as training runs it: its gradient written over the logits.
    w = timing.workload("cross_entropy", {"N": 8, "V": 64}, {"block_size": 64, "num_warps": 1}, torch.float32,
                        torch.device("cpu"))
    logits = w.inputs[0]
    before = logits.detach().clone()
    w.step(w.kernel)()
    expected = (torch.softmax(before, -1) - F.one_hot(w.inputs[1], 64)) / 8  # d mean-loss / d logits
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-6)
