"""The trial side: model, workloads, train_and_measure's measurements and statuses, and ``python -m cotune.trial``."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cotune.config import (
    BatchConfig,
    OptimizerConfig,
    RunConfig,
    TrialConfig,
    TrialResult,
    WorkloadConfig,
)
from cotune.trial.measure import ANONYMOUS_PEAK_SOURCE
from cotune.trial.model import GPT, GPTConfig
from cotune.trial.train import learning_rate_at, train_and_measure
from cotune.trial.workloads import apply_activation_checkpointing, build_model, get_workload

REPO = Path(__file__).resolve().parents[1]

# A short run: 8 sequences of 64 bytes per step, 40 steps to the budget.
BASE = TrialConfig(
    batch=BatchConfig(micro_batch_size=4, global_batch_size=8, grad_accum_steps=2),
    optimizer=OptimizerConfig(learning_rate=3e-3),
    run=RunConfig(warmup_steps=2, measured_steps=4, token_budget=8 * 64 * 40, eval_tokens=2048),
)


def with_(config: TrialConfig, **sections: dict) -> TrialConfig:
    """``config`` with some fields of some sections replaced: ``with_(c, run={"seed": 1})``."""
    return dataclasses.replace(
        config, **{name: dataclasses.replace(getattr(config, name), **kw) for name, kw in sections.items()}
    )


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin corpus's cache, shared with test_data.py (it takes seconds to build)."""
    return tmp_path_factory.getbasetemp() / "cotune-builtin-cache"


@pytest.fixture(scope="module")
def ok_result(cache: Path) -> TrialResult:
    return train_and_measure(BASE, cache_dir=cache)


def oom_workload(cfg: WorkloadConfig) -> nn.Module:
    """A user workload (``<this module>:oom_workload``) whose forward runs out of memory."""

    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(1, 1)])

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    return Hungry()


# ---------------------------------------------------------------------------- model and workloads


def test_gpt_maps_ids_to_logits_with_tied_embeddings() -> None:
    model = GPT(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=4, n_embd=32))
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    assert model.lm_head.weight is model.wte.weight
    assert model.n_params(non_embedding=False) - model.n_params() == 16 * 32  # the position embedding
    # Causal: changing a later token leaves earlier logits as they were.
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 256
    torch.testing.assert_close(model(idx)[:, :10], model(changed)[:, :10])
    assert not torch.allclose(model(idx)[:, 10:], model(changed)[:, 10:])


def test_workload_registry_and_plugins() -> None:
    assert isinstance(build_model(WorkloadConfig()), GPT)
    assert get_workload(f"{__name__}:oom_workload") is oom_workload
    with pytest.raises(ValueError, match="unknown workload 'llama'.*gpt.*hf:<model_type>"):
        get_workload("llama")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        get_workload(f"{__name__}:nope")


def test_activation_checkpointing_wraps_blocks_and_keeps_gradients() -> None:
    plain = build_model(WorkloadConfig(seq_len=16))
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped.blocks)
    assert all(type(b).__name__ == "CheckpointedBlock" for b in wrapped.blocks)
    idx = torch.randint(0, 256, (2, 16))
    for m in (plain, wrapped):
        m(idx).float().pow(2).mean().backward()
    torch.testing.assert_close(plain.wte.weight.grad, wrapped.wte.weight.grad)
    with pytest.raises(ValueError, match="layers as an nn.ModuleList"):
        apply_activation_checkpointing(nn.Linear(2, 2))


def test_learning_rate_schedule() -> None:
    opt = OptimizerConfig(learning_rate=1.0, warmup_fraction=0.1)
    lrs = [learning_rate_at(s, opt, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then only down
    assert lrs[99] == pytest.approx(0.1, abs=1e-3) and lrs[100:] == [pytest.approx(0.1)] * 20


# ---------------------------------------------------------------------------- train_and_measure


@pytest.mark.slow
def test_ok_run_has_sane_metrics(ok_result: TrialResult) -> None:
    r = ok_result
    assert r.status == "ok", r.reason
    m = r.metrics
    keys = {
        "tokens_per_second", "val_loss", "step_time_mean_s", "step_time_std_s", "peak_memory_bytes",
        "peak_memory_source", "peak_rss_bytes", "mfu", "peak_flops", "peak_flops_source", "flops_per_token", "n_params",
        "train_steps", "tokens_trained", "budget_steps", "cpu_cores", "cpu_threads",
    }  # fmt: skip
    assert set(m) == keys
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
    assert m["tokens_per_second"] > 0 and m["step_time_mean_s"] > 0 and m["step_time_std_s"] >= 0
    # One timed step is 8 sequences x 64 tokens; throughput and mean step time must agree.
    assert m["tokens_per_second"] == pytest.approx(512 / m["step_time_mean_s"])
    assert 1.0 < m["val_loss"] < math.log(256)
    assert m["peak_memory_bytes"] > 10 * 2**20 and m["peak_memory_source"] == ANONYMOUS_PEAK_SOURCE
    assert m["peak_rss_bytes"] > m["peak_memory_bytes"]  # the resident set adds file pages: libraries, corpus
    assert 0 < m["mfu"] < 1 and m["peak_flops"] > 1e8
    assert (m["budget_steps"], m["train_steps"], m["tokens_trained"]) == (40, 40, 40 * 512)
    assert m["n_params"] == build_model(BASE.workload).n_params()
    assert m["flops_per_token"] == 6 * m["n_params"] + 12 * 2 * 64 * 64
    assert set(r.phase_seconds) >= {"start_and_import", "data", "model_build", "warmup", "measured", "rest", "eval"}
    assert all(v >= 0 for v in r.phase_seconds.values())
    assert r.phase_seconds["measured"] >= 4 * m["step_time_mean_s"]


@pytest.mark.slow
def test_loss_curve_decreases(ok_result: TrialResult) -> None:
    curve = ok_result.loss_curve
    assert [row[0] for row in curve] == list(range(1, 41))
    assert [row[1] for row in curve] == [512 * s for s in range(1, 41)]
    first, last = (sum(row[2] for row in rows) / 5 for rows in (curve[:5], curve[-5:]))
    assert first > 4.5 and last < first - 1.0


@pytest.mark.slow
def test_same_seed_same_loss_with_and_without_activation_checkpointing(cache: Path) -> None:
    config = with_(BASE, run={"token_budget": 8 * 64 * 8, "warmup_steps": 1, "measured_steps": 2})
    plain = train_and_measure(config, cache_dir=cache)
    ckpt = train_and_measure(with_(config, software={"activation_checkpointing": True}), cache_dir=cache)
    other_seed = train_and_measure(with_(config, run={"seed": 1}), cache_dir=cache)
    assert plain.status == ckpt.status == "ok"
    assert ckpt.metrics["val_loss"] == pytest.approx(plain.metrics["val_loss"], abs=1e-5)
    assert abs(other_seed.metrics["val_loss"] - plain.metrics["val_loss"]) > 1e-4  # the seed matters


@pytest.mark.slow
def test_a_budget_shorter_than_the_timed_steps_is_refused_before_training(cache: Path) -> None:
    """The timed window holds training steps only: the validation loss never falls inside it."""
    with pytest.raises(ValueError, match="warmup_steps \\+ measured_steps must hold, but got 3 steps"):
        train_and_measure(with_(BASE, run={"token_budget": 8 * 64 * 3}), cache_dir=cache)
    r = train_and_measure(with_(BASE, run={"token_budget": 8 * 64 * 6}), cache_dir=cache)  # exactly warm-up + measured
    assert r.status == "ok"
    assert (r.metrics["budget_steps"], r.metrics["train_steps"], r.metrics["tokens_trained"]) == (6, 6, 6 * 512)
    assert len(r.loss_curve) == 6


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs(cache: Path, precision: str) -> None:
    config = with_(BASE, precision={"precision": precision}, run={"token_budget": 8 * 64 * 6})
    r = train_and_measure(config, cache_dir=cache)
    assert r.status == "ok", r.reason
    assert math.isfinite(r.metrics["val_loss"]) and r.metrics["val_loss"] < math.log(256) + 0.1
    assert ("fp16_skipped_steps" in r.metrics) == (precision == "fp16")  # counted where a loss scale can skip
    assert 0 <= r.metrics.get("fp16_skipped_steps", 0) < r.metrics["train_steps"]


def test_huge_learning_rate_diverges(cache: Path) -> None:
    config = with_(BASE, optimizer={"learning_rate": 1e6, "grad_clip": 1e30, "warmup_fraction": 0.0})
    r = train_and_measure(config, cache_dir=cache)
    assert r.status == "diverged"
    assert re.search(r"training loss became (nan|inf) at step \d+ of 40", r.reason), r.reason
    assert not math.isfinite(r.loss_curve[-1][2]) and len(r.loss_curve) < 40  # stopped at once
    json.dumps(r.to_dict(), allow_nan=False)  # NaN is encoded, the JSON stays strict


def test_world_size_above_one_needs_torchrun(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several ranks run under torchrun (tests/test_parallel.py); in-process it is a clear error."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = with_(BASE, parallel={"dp": 2}, batch={"grad_accum_steps": 1})
    with pytest.raises(ValueError, match="world_size=2 runs one process per rank under torchrun"):
        train_and_measure(config, cache_dir=cache)


def test_inconsistent_batch_is_a_bug_with_every_value(cache: Path) -> None:
    with pytest.raises(ValueError, match="micro_batch_size=4, grad_accum_steps=1, dp=1, fsdp=1, global_batch_size=8"):
        train_and_measure(with_(BASE, batch={"grad_accum_steps": 1}), cache_dir=cache)


def test_out_of_memory_is_a_result(cache: Path) -> None:
    r = train_and_measure(with_(BASE, workload={"model": f"{__name__}:oom_workload"}), cache_dir=cache)
    assert r.status == "oom"
    assert "Tried to allocate 64.00 GiB" in r.error_tail and "OutOfMemoryError" in r.error_tail


def test_profile_gives_top_ops_and_a_trace(cache: Path, tmp_path: Path) -> None:
    config = with_(BASE, run={"profile": True, "token_budget": 8 * 64 * 6})
    r = train_and_measure(config, cache_dir=cache, trace_dir=tmp_path / "traces")
    assert r.status == "ok"
    ops = r.profile_top_ops
    assert 3 <= len(ops) <= 15
    assert set(ops[0]) == {"name", "self_time_ms", "calls", "percent"}
    assert any(op["name"] in ("aten::mm", "aten::addmm") for op in ops)
    assert [op["self_time_ms"] for op in ops] == sorted((op["self_time_ms"] for op in ops), reverse=True)
    assert 0 < sum(op["percent"] for op in ops) <= 100.0 + 1e-6
    assert r.phase_seconds["profile"] > 0
    assert r.trace_path == str(tmp_path / "traces" / "trace.json")
    assert json.loads(Path(r.trace_path).read_text())["traceEvents"]


# ---------------------------------------------------------------------------- python -m cotune.trial


def _run_module(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cotune.trial", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_module_writes_a_result(cache: Path, tmp_path: Path) -> None:
    config_path, result_path = tmp_path / "config.json", tmp_path / "result.json"
    config_path.write_text(with_(BASE, run={"token_budget": 8 * 64 * 6}).to_json())
    proc = _run_module(config_path, "--result", result_path, "--cache-dir", cache)
    assert proc.returncode == 0, proc.stderr
    r = TrialResult.load(result_path)
    assert r.status == "ok" and r.metrics["val_loss"] < math.log(256) + 0.1
    assert 0.05 < r.phase_seconds["start_and_import"] < 60  # the torch import, counted from process start
    assert not list(tmp_path.glob("*.tmp"))


def test_module_reports_a_users_error_with_exit_2(cache: Path, tmp_path: Path) -> None:
    config_path, result_path = tmp_path / "config.json", tmp_path / "result.json"
    config_path.write_text(with_(BASE, workload={"data": str(tmp_path / "missing.txt")}).to_json())
    proc = _run_module(config_path, "--result", result_path, "--cache-dir", cache)
    assert proc.returncode == 2
    assert "missing.txt does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not result_path.exists()
    config_path.write_text('{"workload": {}}')
    proc = _run_module(config_path, "--result", result_path, "--cache-dir", cache)
    assert proc.returncode == 2 and "config.json: not a valid trial config" in proc.stderr


def test_cpu_peak_memory_is_the_trial_process_own(tmp_path: Path) -> None:
    """A small process launched by a large one reports its own peak, not its parent's."""
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)  # this process now holds 600 MiB more than a child will
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page so it is resident
    child = ("from cotune.trial.measure import peak_memory; import torch; "
             "print(peak_memory(torch.device('cpu'))['peak_memory_bytes'])")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, timeout=120)
    del ballast
    assert int(out.stdout) < 550 * 2**20  # torch's runtime is ~400 MiB; the parent's extra 600 MiB is not counted


# ---------------------------------------------------------------------------- peak memory on CPU

MIB = 2**20

def _memory_of(config: TrialConfig, cache: Path, folder: Path) -> dict:
    """The memory metrics of ``config`` run in its own process (``python -m cotune.trial``)."""
    folder.mkdir()
    (folder / "config.json").write_text(config.to_json())
    proc = _run_module(folder / "config.json", "--result", folder / "result.json", "--cache-dir", cache)
    assert proc.returncode == 0, proc.stderr
    result = TrialResult.load(folder / "result.json")
    assert result.status == "ok", result.reason
    return result.metrics


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the anonymous peak needs Linux's /proc")
def test_a_bigger_corpus_does_not_look_like_a_bigger_model(cache: Path, tmp_path: Path) -> None:
    """The same trial over a 128 MiB and a 128 KiB token file: the memory-mapped corpus pages the batches
    touch raise the resident set's peak (the old figure), not the anonymous peak (the objective).

    Tolerance: both runs allocate the same tensors (same shapes and seed; only the token values
    differ), so their anonymous peaks differ by one trial's run-to-run spread, under 1 MiB over
    six runs here: allow 4 MiB. Every window read maps at least the 4 KiB page it lies in: 3,072
    random training windows over the 29,491 pages of the train split land on about 2,920 distinct
    pages, the 256 evenly spaced evaluation windows on 256 more, so the resident peak must grow by
    3,000 pages (11.7 MiB) at least, well past that allowance; with the page cache's large folios
    it grows by about 175 MiB here.
    """
    # BASE's model on 8-token windows, 128 a step: 24 steps read 3,072 windows, evaluation 2048 / 8 more.
    config = dataclasses.replace(
        with_(BASE, workload={"seq_len": 8}, run={"token_budget": 128 * 8 * 24}),
        batch=BatchConfig(micro_batch_size=64, global_batch_size=128, grad_accum_steps=2),
    )
    from cotune.data import prepare_data

    rng = np.random.default_rng(0)
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    rng.integers(0, 256, size=64 * 2**10, dtype=np.uint16).tofile(small)
    rng.integers(0, 256, size=64 * MIB, dtype=np.uint16).tofile(big)
    for corpus in (small, big):  # its vocabulary scan (which reads all of it) cached before the trial
        prepare_data(str(corpus), cache)
    m_small, m_big = (_memory_of(with_(config, workload={"data": str(c)}), cache, tmp_path / c.stem)
                      for c in (small, big))
    assert m_big["peak_memory_source"] == m_small["peak_memory_source"] == ANONYMOUS_PEAK_SOURCE
    assert m_big["peak_rss_bytes"] - m_small["peak_rss_bytes"] >= 3000 * 4096
    assert abs(m_big["peak_memory_bytes"] - m_small["peak_memory_bytes"]) <= 4 * MIB


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the anonymous peak needs Linux's /proc")
def test_a_model_four_times_larger_reports_a_larger_peak(cache: Path, tmp_path: Path) -> None:
    """4 layers 128 wide (0.83 M parameters) against 256 wide (3.2 M): at the optimizer step the
    parameters, their gradients and AdamW's two moments are all alive in fp32, so the anonymous peak
    must grow by 16 bytes per added parameter at least (activations come on top)."""
    two_steps = {"warmup_steps": 1, "measured_steps": 1, "token_budget": 8 * 64 * 2}  # step 2 holds AdamW's
    sizes = [with_(BASE, workload={"n_layer": 4, "n_embd": width}, run=two_steps) for width in (128, 256)]
    m_small, m_big = (_memory_of(c, cache, tmp_path / f"w{c.workload.n_embd}") for c in sizes)
    assert 3.5 < m_big["n_params"] / m_small["n_params"] < 4.5
    added = m_big["n_params"] - m_small["n_params"]
    assert m_big["peak_memory_bytes"] - m_small["peak_memory_bytes"] >= 16 * added
