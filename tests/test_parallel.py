"""Parallel layouts run for real under torchrun on CPU (gloo), checked against one process.

The equivalence gate: each layout trains the same model, on the same global batches,
from the same seed, and must give the single-process fp32 losses step for step. A
sharding bug fails here instead of skewing a study.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from cotune import runner
from cotune.config import (
    BatchConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrialConfig,
    WorkloadConfig,
)
from cotune.data import default_cache_dir
from cotune.trial.model import GPT, GPTConfig

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # every test runs trials under torchrun

# Losses are compared to this tolerance: fp32 collectives add in another order than one
# process does (observed differences are about 1e-6).
RTOL, ATOL = 1e-5, 1e-5

BASE = TrialConfig(
    workload=WorkloadConfig(n_layer=4, n_embd=32, n_head=4, seq_len=32),
    batch=BatchConfig(micro_batch_size=4, global_batch_size=8, grad_accum_steps=2),
    # A large learning rate makes a wrong gradient visible within a step or two.
    optimizer=OptimizerConfig(learning_rate=1e-2, warmup_fraction=0.0),
    run=RunConfig(token_budget=6 * 8 * 32, warmup_steps=1, measured_steps=2, eval_tokens=1024, timeout_s=180),
)

LAYOUTS = {
    "dp2": ParallelConfig(dp=2),
    "fsdp2": ParallelConfig(fsdp=2),
    "tp2": ParallelConfig(tp=2),
    "tp2-sequence-parallel": ParallelConfig(tp=2, sequence_parallel=True),
    "pp2-1f1b": ParallelConfig(pp=2, pp_schedule="1f1b", pp_microbatches=2),
    "pp2-interleaved": ParallelConfig(pp=2, pp_schedule="interleaved1f1b", pp_microbatches=2, pp_virtual_stages=2),
    "fsdp2xtp2": ParallelConfig(fsdp=2, tp=2),  # 2-D on 4 processes
    # Sequence-sharded activations crossing pipeline stages, and the first/last stage's cut and gather.
    "pp2xtp2-sequence-parallel": ParallelConfig(pp=2, tp=2, sequence_parallel=True, pp_microbatches=2),
}


def layout(par: ParallelConfig) -> TrialConfig:
    """BASE with ``par``: the same global batch, so fewer accumulation steps per data-parallel rank."""
    per_rank = BASE.batch.global_batch_size // par.data_parallel
    batch = replace(BASE.batch, grad_accum_steps=per_rank // BASE.batch.micro_batch_size)
    return replace(BASE, parallel=par, batch=batch)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    result = runner.launch_trial(BASE, tmp_path_factory.mktemp("single"), cache_dir=default_cache_dir())
    assert result.status == "ok", result.reason + result.error_tail
    return result


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(single, tmp_path, name):
    config = layout(LAYOUTS[name])
    result = runner.launch_trial(config, tmp_path, cache_dir=default_cache_dir())
    assert result.status == "ok", f"{result.reason}\n{result.error_tail}"
    losses = [step[2] for step in result.loss_curve]
    expected = [step[2] for step in single.loss_curve]
    assert len(losses) == len(expected) == 6
    assert losses == pytest.approx(expected, rel=RTOL, abs=ATOL)
    assert losses[-1] < losses[0] - 0.5  # it trained: a frozen model would pass trivially
    assert result.metrics["val_loss"] == pytest.approx(single.metrics["val_loss"], rel=RTOL, abs=ATOL)
    m = result.metrics
    assert m["tokens_per_second"] > 0 and m["peak_memory_bytes"] > 0  # global throughput, max over ranks


# fp16 autocast rounds each layout's matmuls the same way, but its sums still differ in order
# and each rounding error is ~1e-3 relative.
FP16_RTOL = 2e-3


@pytest.fixture(scope="module")
def single_fp16(tmp_path_factory):
    config = replace(BASE, precision=PrecisionConfig("fp16"))
    result = runner.launch_trial(config, tmp_path_factory.mktemp("single-fp16"), cache_dir=default_cache_dir())
    assert result.status == "ok", result.reason + result.error_tail
    return result


@pytest.mark.parametrize("name", ["fsdp2", "pp2-1f1b"])
def test_fp16_loss_scaling_across_processes_matches_one_process(single_fp16, tmp_path, name):
    """The dynamic loss scale multiplies every rank's loss (the pipeline's loss function too)
    and is divided out before clipping: a layout that missed either would train differently."""
    config = replace(layout(LAYOUTS[name]), precision=PrecisionConfig("fp16"))
    result = runner.launch_trial(config, tmp_path, cache_dir=default_cache_dir())
    assert result.status == "ok", f"{result.reason}\n{result.error_tail}"
    losses = [step[2] for step in result.loss_curve]
    assert losses == pytest.approx([step[2] for step in single_fp16.loss_curve], rel=FP16_RTOL)
    assert result.metrics["val_loss"] == pytest.approx(single_fp16.metrics["val_loss"], rel=FP16_RTOL)


# Hugging Face models under the same gate: the model's own forward on one process; its TP plan,
# its layers as FSDP units, its pipeline stages on several. Tiny, fp32, no dropout (cotune sets 0).
HF_MODELS = {
    "hf:llama": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 64},
    "hf:gpt2": {"n_embd": 32, "n_layer": 4, "n_head": 4},
    "hf:bert": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64},
}
HF_LAYOUTS = [
    ("hf:llama", "dp2"), ("hf:llama", "fsdp2"), ("hf:llama", "tp2"), ("hf:llama", "pp2-1f1b"), ("hf:llama", "fsdp2xtp2"),
    ("hf:llama", "tp2-sequence-parallel"),  # RMSNorms on T / tp, attention gathering its keyword input
    ("hf:gpt2", "tp2"), ("hf:gpt2", "pp2-1f1b"),  # GPT-2's fused q/k/v split per head; tied wte / lm_head
    ("hf:gpt2", "pp2xtp2-sequence-parallel"),  # sequence-sharded activations crossing GPT-2's stages
    ("hf:bert", "tp2"), ("hf:bert", "pp2-1f1b"),  # masked LM: a pipeline chunk's loss is weighted by its masks
]


def hf_base(model: str) -> TrialConfig:
    from cotune.trial.hf import resolve_config

    fields, objective = resolve_config(model, HF_MODELS[model], seq_len=32, vocab_size=258, eot_id=256, pad_id=None)
    workload = WorkloadConfig(model=model, config=fields, objective=objective, n_layer=4, n_embd=32, n_head=4,
                              seq_len=32, vocab_size=258)
    return replace(BASE, workload=workload)


@pytest.fixture(scope="module")
def hf_single(tmp_path_factory):
    results = {}
    for model in HF_MODELS:
        result = runner.launch_trial(hf_base(model), tmp_path_factory.mktemp("single"), cache_dir=default_cache_dir())
        assert result.status == "ok", result.reason + result.error_tail
        results[model] = result
    return results


@pytest.mark.parametrize("model, name", HF_LAYOUTS, ids=[f"{m}-{n}" for m, n in HF_LAYOUTS])
def test_hf_layout_matches_one_process(hf_single, tmp_path, model, name):
    base = hf_base(model)
    per_rank = base.batch.global_batch_size // LAYOUTS[name].data_parallel
    config = replace(base, parallel=LAYOUTS[name],
                     batch=replace(base.batch, grad_accum_steps=per_rank // base.batch.micro_batch_size))
    result = runner.launch_trial(config, tmp_path, cache_dir=default_cache_dir())
    assert result.status == "ok", f"{result.reason}\n{result.error_tail}"
    losses = [step[2] for step in result.loss_curve]
    expected = [step[2] for step in hf_single[model].loss_curve]
    assert len(losses) == len(expected) == 6
    assert losses == pytest.approx(expected, rel=RTOL, abs=ATOL)
    assert losses[-1] < losses[0] - 0.5
    assert result.metrics["val_loss"] == pytest.approx(hf_single[model].metrics["val_loss"], rel=RTOL, abs=ATOL)


def test_a_failed_ranks_own_exception_is_the_error_tail(tmp_path):
    """Not torchrun's summary: the first rank to fail wrote its exception, and that is the trial's."""
    config = replace(layout(ParallelConfig(dp=2)), workload=replace(BASE.workload, model=f"{__name__}:crash_on_rank1"))
    result = runner.launch_trial(config, tmp_path, cache_dir=default_cache_dir())
    assert result.status == "crash"
    assert result.reason.startswith("AttributeError on rank 1: ") and "no_such_thing" in result.reason
    assert "no_such_thing" in result.error_tail and 'File "' in result.error_tail  # its traceback's last lines
    assert _processes_of(tmp_path) == []


def test_a_sharding_bug_fails_the_gate(single, tmp_path):
    """The gate's own check: a data-parallel run that drops the other rank's half of the batch."""
    wrong = replace(layout(ParallelConfig(dp=2)), batch=replace(BASE.batch, global_batch_size=4, grad_accum_steps=1))
    result = runner.launch_trial(wrong, tmp_path, cache_dir=default_cache_dir())
    losses = [step[2] for step in result.loss_curve]
    assert losses != pytest.approx([step[2] for step in single.loss_curve], rel=RTOL, abs=ATOL)


class _HangOnRank1(GPT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(os.environ.get("RANK", "0")) == 1:
            time.sleep(3600)  # rank 0 waits for this one in its first collective, forever
        return super().forward(x)


def hang_on_rank1(cfg: WorkloadConfig) -> nn.Module:
    return _HangOnRank1(GPTConfig(cfg.vocab_size, cfg.seq_len, cfg.n_layer, cfg.n_head, cfg.n_embd))


class _OomOnRank1(GPT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(os.environ.get("RANK", "0")) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (on purpose)")
        return super().forward(x)


def oom_on_rank1(cfg: WorkloadConfig) -> nn.Module:
    return _OomOnRank1(GPTConfig(cfg.vocab_size, cfg.seq_len, cfg.n_layer, cfg.n_head, cfg.n_embd))


class _CrashOnRank1(GPT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(os.environ.get("RANK", "0")) == 1:
            return self.no_such_thing(x)
        return super().forward(x)


def crash_on_rank1(cfg: WorkloadConfig) -> nn.Module:
    return _CrashOnRank1(GPTConfig(cfg.vocab_size, cfg.seq_len, cfg.n_layer, cfg.n_head, cfg.n_embd))


def _processes_of(trial_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(trial_dir) in part for part in p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_rank_hanging_in_a_collective_times_out_and_leaves_nothing(tmp_path):
    config = replace(layout(ParallelConfig(dp=2)),
                     workload=replace(BASE.workload, model=f"{__name__}:hang_on_rank1"),
                     run=replace(BASE.run, timeout_s=25))
    started = time.monotonic()
    result = runner.launch_trial(config, tmp_path, cache_dir=default_cache_dir())
    assert result.status == "timeout", f"{result.status}: {result.reason}\n{result.error_tail}"
    assert time.monotonic() - started < 45
    assert _processes_of(tmp_path) == []  # torchrun's agent and both ranks are gone


def test_out_of_memory_on_another_rank_is_classified(tmp_path):
    config = replace(layout(ParallelConfig(dp=2)), workload=replace(BASE.workload, model=f"{__name__}:oom_on_rank1"))
    result = runner.launch_trial(config, tmp_path, cache_dir=default_cache_dir())
    assert result.status == "oom", f"{result.status}: {result.reason}\n{result.error_tail}"
    assert "rank 1" in result.reason and "OutOfMemoryError" in result.error_tail
    assert _processes_of(tmp_path) == []


def _count_host_syncs(config: TrialConfig, tmp_path: Path, name: str) -> dict:
    """tests/probes/host_syncs.py on ``config``: one process, or under torchrun for its world size."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    world = config.parallel.world_size
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
                                   if world > 1 else [])
    (tmp_path / f"{name}.json").write_text(config.to_json())
    done = subprocess.run([*launcher, str(ROOT / "tests" / "probes" / "host_syncs.py"), str(tmp_path / f"{name}.json"),
                           str(tmp_path / f"{name}.out.json")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((tmp_path / f"{name}.out.json").read_text())


def test_a_timed_step_syncs_the_host_as_often_in_every_layout(tmp_path):
    """The timed window holds training steps only: no loss read back, no gradient norm brought to the host,
    in any layout, so a sharded layout pays only its own collectives. What is left is the same in all (AdamW's
    per-parameter step counter, the same parameters on every rank here)."""
    one = _count_host_syncs(BASE, tmp_path, "one")
    for name in ("dp2", "fsdp2", "tp2"):
        counted = _count_host_syncs(layout(LAYOUTS[name]), tmp_path, name)
        assert counted["host_syncs_per_step"] == one["host_syncs_per_step"], (name, counted, one)
    assert one["collectives_per_step"] == 0
