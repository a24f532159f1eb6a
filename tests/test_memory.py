"""The analytic memory model against the real model: parameter count, saved activations, peak, sharding."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cotune import hardware, memory
from cotune.config import (
    BatchConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    SoftwareConfig,
    TrialConfig,
    WorkloadConfig,
)
from cotune.trial import train
from cotune.trial.live_tensors import LiveTensorBytes
from cotune.trial.model import GPT, GPTConfig
from cotune.trial.workloads import apply_activation_checkpointing, build_model

TINY = WorkloadConfig(n_layer=2, n_embd=64, n_head=4, seq_len=64, vocab_size=258)
WIDER = WorkloadConfig(n_layer=3, n_embd=96, n_head=6, seq_len=48, vocab_size=512)
GIB = 2**30


def config(wl: WorkloadConfig = TINY, *, micro: int = 8, accum: int = 1, precision: str = "fp32",
           ckpt: bool = False, device: str = "cpu", **parallel) -> TrialConfig:
    par = ParallelConfig(**parallel)
    return TrialConfig(
        workload=wl,
        batch=BatchConfig(micro, micro * accum * par.data_parallel, accum),
        parallel=par,
        precision=PrecisionConfig(precision),
        software=SoftwareConfig(activation_checkpointing=ckpt),
        run=RunConfig(device=device, warmup_steps=1, measured_steps=1,
                      token_budget=2 * micro * accum * par.data_parallel * wl.seq_len, eval_tokens=wl.seq_len),
    )


def with_(c: TrialConfig, **sections: dict) -> TrialConfig:
    return dataclasses.replace(c, **{k: dataclasses.replace(getattr(c, k), **v) for k, v in sections.items()})


# --------------------------------------------------------------------------- against the real model


@pytest.mark.parametrize("wl", [TINY, WIDER, WorkloadConfig(n_layer=12, n_embd=768, n_head=12, seq_len=1024,
                                                            vocab_size=50304)])
def test_parameter_count_is_the_models(wl: WorkloadConfig) -> None:
    model = GPT(GPTConfig(vocab_size=wl.vocab_size, seq_len=wl.seq_len, n_layer=wl.n_layer, n_head=wl.n_head,
                          n_embd=wl.n_embd))
    assert memory.n_params(config(wl)) == model.n_params(non_embedding=False)
    single = memory.estimate(config(wl))
    assert single.parameters == 4 * model.n_params(non_embedding=False)  # fp32 master weights


def saved_tensor_bytes(c: TrialConfig) -> int:
    """Bytes of the distinct storages autograd saves in one forward + loss, parameters excluded."""
    torch.manual_seed(0)
    model = build_model(c.workload)
    if c.software.activation_checkpointing:
        apply_activation_checkpointing(model.blocks)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    T, B = c.workload.seq_len, c.batch.micro_batch_size
    xy = torch.randint(0, c.workload.vocab_size, (B, T + 1))
    x, y = xy[:, :-1], xy[:, 1:]  # as the trainer slices them: y is not contiguous
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.precision.precision)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # as trainer.cross_entropy
    return sum(seen.values())


@pytest.mark.parametrize("wl", [TINY, WIDER], ids=["tiny", "wider"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_saved_activations_match_saved_tensor_hooks(wl: WorkloadConfig, precision: str, ckpt: bool) -> None:
    c = config(wl, micro=4, precision=precision, ckpt=ckpt)
    measured = saved_tensor_bytes(c)
    # Counted tensor by tensor: exact but for a few bytes of scalars (the loss, its weight), so 0.1%.
    assert memory.saved_activation_bytes(c) == pytest.approx(measured, rel=1e-3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin corpus's cache, shared with test_data.py (it takes seconds to build)."""
    return tmp_path_factory.getbasetemp() / "cotune-builtin-cache"


@pytest.mark.slow
@pytest.mark.parametrize(
    "c",
    [config(micro=8), config(micro=8, ckpt=True), config(WIDER, micro=4, accum=2, precision="bf16"),
     config(WIDER, micro=8, ckpt=True, precision="bf16")],
    ids=["fp32", "fp32-checkpointed", "bf16-accumulating", "bf16-checkpointed"],
)
def test_peak_matches_the_live_tensor_peak_of_a_real_trial(
    c: TrialConfig, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The matmul probe behind MFU would add its own matrices to the peak: not the training's.
    monkeypatch.setattr(hardware, "peak_flops", lambda *a, **k: (1e12, "test"))
    tracker = LiveTensorBytes()
    with tracker:
        result = train.train_and_measure(c, cache_dir=cache)
    assert result.status == "ok", result.reason
    assert memory.estimate(c).tensors == pytest.approx(tracker.peak, rel=0.05)


# --------------------------------------------------------------------------- sharding


def test_fsdp_shards_parameters_gradients_and_optimizer_state() -> None:
    single = memory.estimate(config(micro=4, accum=2, device="cuda"))
    sharded = memory.estimate(config(micro=4, accum=2, device="cuda", fsdp=4))
    assert sharded.parameters == pytest.approx(single.parameters / 4)
    assert sharded.gradients == pytest.approx(single.gradients / 4)  # accumulating: all gradients held
    assert sharded.optimizer_state == pytest.approx(single.optimizer_state / 4)
    assert sharded.optimizer_state == pytest.approx(2 * sharded.parameters)  # AdamW: two fp32 moments
    assert sharded.buffers > single.buffers  # the unsharded block and root FSDP gathers


def test_tp_splits_block_matmuls_but_not_embeddings_or_norms() -> None:
    wl = WIDER
    C, L = wl.n_embd, wl.n_layer
    est = memory.estimate(config(wl, device="cuda", tp=2))
    embeddings_and_norms = wl.vocab_size * C + wl.seq_len * C + 2 * C + L * 4 * C
    split = L * (12 * C * C + 7 * C) / 2  # q, k, v, proj, fc, mlp.proj weights; q, k, v, fc biases
    whole_biases = L * 2 * C  # row-parallel proj and mlp.proj biases
    assert est.parameters == 4 * (embeddings_and_norms + split + whole_biases)
    single, split_layer = config(wl), config(wl, tp=2)
    per_layer = memory.layer_activation_bytes_per_token
    # LayerNorm inputs/outputs stay whole; q, k, v, attention output, MLP hidden are split.
    assert per_layer(single) > per_layer(split_layer) > per_layer(single) / 2


def test_dp_replicates_and_adds_ddp_buckets() -> None:
    single = memory.estimate(config(micro=4, device="cuda"))
    replicated = memory.estimate(config(micro=4, device="cuda", dp=4))
    assert (replicated.parameters, replicated.optimizer_state) == (single.parameters, single.optimizer_state)
    assert replicated.total > single.total  # gradient buckets, and the foreach AdamW of several ranks


def test_pipeline_stages_hold_their_layers_and_in_flight_microbatches() -> None:
    wl = WorkloadConfig(n_layer=8, n_embd=64, n_head=4, seq_len=64, vocab_size=258)
    c = config(wl, micro=8, pp=4, pp_microbatches=8, pp_schedule="1f1b")
    assert [memory.in_flight(c, r) for r in range(4)] == [4, 3, 2, 1]  # min(m, pp - rank)
    gpipe = with_(c, parallel={"pp_schedule": "gpipe"})
    assert [memory.in_flight(gpipe, r) for r in range(4)] == [8] * 4  # every microbatch
    inter = with_(c, parallel={"pp_schedule": "interleaved1f1b", "pp_virtual_stages": 2})
    # (v - 1) * pp + 2 * (pp - 1 - rank) + 1 chunks of n_layer / (pp * v) layers
    assert [memory.in_flight(inter, r) for r in range(4)] == [11, 9, 7, 5]
    assert memory.in_flight(config(wl), 0) == 1
    # The whole model's parameters are spread over the stages; the tied matrix is on two of them.
    C, V = wl.n_embd, wl.vocab_size
    stage_params = [memory.stage_params(c, s) for s in range(4)]
    assert sum(stage_params) == memory.n_params(c) + V * C
    assert stage_params[0] - stage_params[1] == V * C + wl.seq_len * C  # wte, wpe
    assert stage_params[3] - stage_params[1] == V * C + 2 * C  # lm_head, ln_f
    # More microbatches in flight hold more activations: GPipe's first stage above 1F1B's.
    assert memory.estimate(gpipe).activations > memory.estimate(c).activations


# --------------------------------------------------------------------------- behaviour


def test_bigger_micro_batch_needs_more_and_checkpointing_less() -> None:
    small, big = memory.estimate(config(WIDER, micro=4)), memory.estimate(config(WIDER, micro=16))
    assert big.activations > 3 * small.activations and big.total > small.total
    plain, ckpt = config(WIDER, micro=16), config(WIDER, micro=16, ckpt=True)
    assert memory.saved_activation_bytes(ckpt) < memory.saved_activation_bytes(plain) / 5
    assert memory.estimate(ckpt).tensors < memory.estimate(plain).tensors
    assert memory.layer_activation_bytes_per_token(config(precision="bf16")) < \
        memory.layer_activation_bytes_per_token(config(precision="fp32"))


def test_fits_gives_a_reason_with_the_figures() -> None:
    est = memory.estimate(config(WorkloadConfig(n_layer=24, n_embd=1024, n_head=16, seq_len=1024,
                                                vocab_size=50304), micro=32, device="cuda"))
    assert memory.fits(est, 200 * GIB) == ""
    reason = memory.fits(est, 8 * GIB)
    assert reason.startswith(f"estimated peak {est.total / GIB:.3g} GiB per rank (")
    assert "activations" in reason and reason.endswith("exceeds the device's 8 GiB")
    assert "GiB per rank" in est.describe() and est.phase in est.describe()


def test_capacity_and_runtime_come_from_the_fingerprint() -> None:
    fp = {"hardware": {"memory_bytes": 64 * GIB, "cpu_runtime_bytes": 200 * 2**20,
                       "gpus": [{"memory_bytes": 80 * GIB}, {"memory_bytes": 40 * GIB}]}}
    assert memory.capacity_bytes(fp, "cuda", 1) == 80 * GIB
    assert memory.capacity_bytes(fp, "cuda", 2) == 40 * GIB  # the smallest GPU a rank may get
    assert memory.capacity_bytes(fp, "cpu", 4) == 16 * GIB  # the host shared by 4 processes
    assert memory.runtime_bytes(fp, "cuda") == 0.0
    assert memory.runtime_bytes(fp, "cpu") == 200 * 2**20 + memory.CPU_TRIAL_IMPORTS_BYTES  # an old one: RSS
    fp["hardware"]["cpu_runtime_anonymous_bytes"] = 130 * 2**20  # what a CPU trial's peak counts, where known
    assert memory.runtime_bytes(fp, "cpu") == 130 * 2**20 + memory.CPU_TRIAL_IMPORTS_BYTES
    est = memory.estimate(config(), runtime_bytes=memory.runtime_bytes(fp, "cpu"))
    assert est.runtime == memory.runtime_bytes(fp, "cpu") and est.total > est.runtime + est.tensors


def test_the_real_fingerprint_records_the_runtime(fingerprint: dict) -> None:
    hw = fingerprint["hardware"]
    assert 50 * 2**20 < hw["cpu_runtime_bytes"] < 4 * GIB
    if sys.platform.startswith("linux"):  # torch's code is file-backed: in the RSS, not the anonymous memory
        assert 50 * 2**20 < hw["cpu_runtime_anonymous_bytes"] < hw["cpu_runtime_bytes"] - 20 * 2**20


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the anonymous peak needs Linux's /proc")
def test_runtime_is_what_a_minimal_trial_peaks_at(fingerprint: dict, cache: Path, tmp_path: Path) -> None:
    """A trial whose model is a few KiB peaks at the runtime the estimate assumes, within 10% (20 MiB
    here): a larger gap means the imports' constant no longer fits this torch (benchmarks/memory_model.py
    re-measures it). Run as the search runs it, in its own process."""
    from cotune import runner

    minimal = config(WorkloadConfig(n_layer=1, n_embd=16, n_head=4, seq_len=16, vocab_size=258), micro=1)
    result = runner.launch_trial(minimal, tmp_path, cache_dir=cache)
    assert result.status == "ok", result.reason + result.error_tail
    estimate = memory.estimate(minimal, runtime_bytes=memory.runtime_bytes(fingerprint, "cpu"))
    assert estimate.tensors < 2**20
    assert result.metrics["peak_memory_bytes"] == pytest.approx(estimate.total, rel=0.10)


def test_memory_module_does_not_import_torch() -> None:
    code = "import sys, cotune.memory; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
