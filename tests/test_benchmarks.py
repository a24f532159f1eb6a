"""The benchmark scripts run: without a GPU the kernel benchmark says so and exits 0, and its
loop runs end to end in Triton's interpreter; the data benchmark runs with a small BPE."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "kernels.py"


def test_kernel_benchmark_without_a_gpu_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark would time the kernels")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no CUDA GPU here") and "nothing was timed" in out.stdout


@pytest.mark.slow
def test_kernel_benchmark_loop_in_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the flag sets it itself
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu-interpreter", "--json", str(tmp_path / "k.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    for kernel in ("mlp", "cross_entropy", "layernorm"):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert mine[0]["impl"] == "pytorch eager" and len(mine) >= 3, mine  # eager and at least two tile configs
        assert all(r["ms"] > 0 for r in mine)
    assert "best triton / eager time" in out.stdout


@pytest.mark.slow
def test_data_prep_benchmark_times_first_and_cached_preparation(tmp_path):
    script = ROOT / "benchmarks" / "data_prep.py"
    out = subprocess.run([sys.executable, str(script), "--bpe", "300", "--max-docs", "40", "--json", str(tmp_path / "d.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [(r["data"], r["tokenizer"]) for r in rows] == [
        ("builtin", "bytes"), ("builtin", "bpe:300"), ("JSON Lines copy", "bytes"), ("JSON Lines copy", "bpe:300")]
    assert all(r["cached_s"] < r["first_s"] and r["train_tokens"] > 0 and r["val_tokens"] > 0 for r in rows)
    assert [r["vocab_size"] for r in rows] == [258, 300, 258, 300]
    assert "| builtin | bpe:300 |" in out.stdout


@pytest.mark.slow
def test_tpe_told_constraints_proposes_fewer_infeasible_configs_than_told_fail(tmp_path):
    """The infeasible-region benchmark, with fewer seeds: cotune's engine (constraints) against FAIL."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "infeasible.py"), "--seeds", "4", "--asks", "60",
                          "--json", str(tmp_path / "i.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads((tmp_path / "i.json").read_text())
    constraint, fail = figures["constraint"], figures["fail"]
    assert len(constraint["shares"]) == len(fail["shares"]) == 4
    assert constraint["infeasible_share_after_startup"] < fail["infeasible_share_after_startup"]
    assert constraint["launched"] > fail["launched"]


@pytest.mark.slow
def test_replayed_on_the_shipped_table_cotune_reaches_the_front_sooner_than_optunas_tpe(tmp_path):
    """The replay benchmark on the recorded table (few seeds): cotune's engine needs less simulated
    wall-clock than Optuna's default TPE to reach 95% of the table's hypervolume."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_efficiency.py"), "--seeds", "3",
                          "--engines", "cotune,tpe", "--svg", "", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    medians = json.loads((tmp_path / "r.json").read_text())
    assert medians["cotune"]["reached"] >= 2, medians
    assert float(medians["cotune"]["seconds"]) < float(medians["tpe"]["seconds"]), medians
