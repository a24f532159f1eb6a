"""`cotune report`: the data behind it, the page, the terminal summary and the CLI's errors.

Real data comes from a real 4-trial CPU search (the session's ``real_search``); studies
that a real search rarely makes (nothing ok, one objective, a measured baseline,
three objectives) come from ``run_search`` with a fast fake trial.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from cotune import search
from cotune.config import STATUSES, TrialConfig, TrialResult
from cotune.errors import UserError
from cotune.report import analysis, report_info
from cotune.report.render import render, write_report
from cotune.report.summary import summary_table
from cotune.space import load_space
from cotune.study import distinct_configs, pareto_trials
from tests.conftest import CPU_SPACE, run_cli

STUDY = "cpu-tiny-gpt"


def load_real(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{folder / 'cotune.db'}")


def fake_run(config: TrialConfig, trial_dir: Path) -> TrialResult:
    """Throughput grows with the micro batch, loss is best near lr=3e-3: a real trade-off, instantly."""
    k = config.flat()
    tokens_per_second = 1000.0 * config.batch.micro_batch_size / (1.3 if k["activation_checkpointing"] else 1.0)
    loss = 2.0 + (math.log10(k["learning_rate"]) + 2.5) ** 2 + 0.002 * k["global_batch_size"]
    return TrialResult(status="ok", metrics={
        "tokens_per_second": tokens_per_second, "val_loss": loss, "peak_memory_bytes": 1e6 * (10 + k["micro_batch_size"]),
        "mfu": 0.1, "step_time_mean_s": 0.05, "step_time_std_s": 0.01,
    }, loss_curve=[[1, 64, 5.0], [2, 128, loss]], phase_seconds={"measured": 1.0, "process_wall": 2.0})


def always_failing(config: TrialConfig, trial_dir: Path) -> TrialResult:
    """Every way a trial can fail, in turn (the trial folder's name ends in the trial number)."""
    status = ["oom", "timeout", "crash", "diverged"][int(trial_dir.name.rsplit("-", 1)[1]) % 4]
    return TrialResult(status=status, reason=f"{status} on purpose",
                       error_tail=f"Traceback (most recent call last):\n  ...\nRuntimeError: {status} <b>tag</b>")


def fake_study(tmp_path: Path, fingerprint: dict, run_fn, budget: int = 14, enqueue: tuple[dict, ...] = (), **kw):
    """A study made by the real search engine with ``run_fn`` in place of real trials."""
    space = load_space(CPU_SPACE)
    settings = search.SearchSettings(**{
        "space": space, "space_path": str(CPU_SPACE), "objectives": list(space.objectives), "budget": budget,
        "fingerprint": fingerprint, "vocab_size": 256, "runs_dir": tmp_path / "runs", "seed": 0,
        "world_size": search.check_hardware(space, str(CPU_SPACE), fingerprint), **kw,
    })
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'fake.db'}")
    study = search.create_or_resume_study(storage, "fake", settings)
    for params in enqueue:
        study.enqueue_trial(params)
    search.run_search(study, settings, run_fn)
    return study


# --- the numbers ---------------------------------------------------------------------------------------------


def test_hypervolume_of_known_fronts():
    front = np.array([[0.0, 3.0], [1.0, 1.0], [3.0, 0.0]])
    assert analysis.hypervolume(front, np.array([4.0, 4.0])) == pytest.approx(4 + 6 + 1)
    # A dominated point and one beyond the reference add nothing.
    more = np.vstack([front, [[2.0, 2.0], [5.0, -1.0]]])
    assert analysis.hypervolume(more, np.array([4.0, 4.0])) == pytest.approx(11.0)
    cubes = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])  # a 2x2x1 and a 1x1x2 box sharing a unit cube
    assert analysis.hypervolume(cubes, np.array([2.0, 2.0, 2.0])) == pytest.approx(4 + 2 - 1)
    history = analysis.hypervolume_history(front, np.array([4.0, 4.0]), np.array([0.0, 0.0]))
    assert history.tolist() == pytest.approx([4 / 16, 10 / 16, 11 / 16])


def test_knee_is_where_the_front_bends():
    # Minimised: (x, y) with a sharp corner at (1, 1); the extremes are (0, 10) and (10, 0).
    front = np.array([[0.0, 10.0], [0.5, 5.0], [1.0, 1.0], [5.0, 0.5], [10.0, 0.0]])
    assert analysis.knee(front) == 2
    assert analysis.best_so_far(np.array([np.nan, 3.0, 2.0, np.nan, 5.0]), "maximize").tolist()[1:] == [3, 3, 3, 5]


# --- a real study ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_report_flag_writes_a_self_contained_page(real_search):
    page = real_search / "reports" / f"{STUDY}.html"
    assert "report written to reports/cpu-tiny-gpt.html" in (real_search / "search.out").read_text()
    html = page.read_text()
    assert html.count("* plotly.js v") == 1  # plotly.js embedded exactly once
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", html)  # nothing loaded from elsewhere
    for anchor in ("pareto", "pick", "convergence", "why", "failed", "where", "depth"):
        assert f'<section id="{anchor}">' in html
    for div in ("fig-pareto", "fig-convergence", "fig-parallel", "fig-loss", "fig-steps", "fig-phases"):
        assert f'id="{div}"' in html


@pytest.mark.slow
def test_report_info_of_a_real_study(real_search):
    study = load_real(real_search)
    info = report_info(study)
    best = study.best_trials
    assert sorted(info.pareto_numbers) == sorted(t.number for t in best)
    assert len(info.picks) == len(distinct_configs(pareto_trials(study)))
    assert info.knee is None or info.knee in info.picks.index
    fastest = max(best, key=lambda t: t.values[0])
    assert info.extremes["tokens_per_second"] == fastest.number
    assert list(info.picks["tokens_per_second"]) == sorted(info.picks["tokens_per_second"], reverse=True)
    # Hypervolume after each counted trial: never falls, between 0 and 1, reference point stated.
    c = info.convergence
    assert c.kind == "hypervolume" and len(c.values) == 4
    assert all(b >= a for a, b in zip(c.values, c.values[1:])) and 0 < c.values[-1] <= 1
    assert c.reference["tokens_per_second"] < min(t.values[0] for t in best)
    assert c.reference["val_loss"] > max(t.values[1] for t in best)
    assert info.importances is None and "at least 10 ok trials" in info.notes["importance"]
    assert sum(info.status_counts.values()) == 4
    assert info.fingerprint["hardware_id"] == study.user_attrs["hardware_id"]
    ok = info.ok
    assert (ok["step_time_std_s"] >= 0).all() and all(len(c) >= 2 for c in ok["loss_curve"])
    assert all(ops for ops in ok["profile_top_ops"])  # the search ran with --profile
    html = render(info)
    for n in info.picks.index:
        assert f"trial {n}" in html
    assert "Top profiler ops" in html
    assert info.fingerprint["software"]["torch"] in html and info.fingerprint["software"]["optuna"] in html


@pytest.mark.slow
def test_report_command_default_path_and_summary(real_search, tmp_path):
    shutil.copy(real_search / "cotune.db", tmp_path / "cotune.db")
    result = run_cli("report", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "reports" / f"{STUDY}.html").stat().st_size > 1_000_000
    summary = run_cli("report", "--summary", cwd=tmp_path / "reports", env={"COLUMNS": "220"})
    assert summary.returncode == 2 and "no database file" in summary.stderr  # no cotune.db there, none made
    assert not (tmp_path / "reports" / "cotune.db").exists()
    summary = run_cli("report", "--summary", "--storage", f"sqlite:///{tmp_path / 'cotune.db'}", cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    study = load_real(real_search)
    assert f"Pareto set of {STUDY}" in summary.stdout and "convergence:" in summary.stdout
    for t in distinct_configs(pareto_trials(study)):
        assert f"{t.values[0]:,.0f}" in summary.stdout
    out = tmp_path / "deep" / "er" / "r.html"
    both = run_cli("report", "--summary", "-o", str(out), cwd=tmp_path)
    assert both.returncode == 0 and out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--study", "nope"], "--study 'nope' is not in"),
    (["--storage", "not-a-url"], "is not a database URL"),
    (["--storage", "sqlite:///missing.db"], "there is no database file missing.db"),
    (["--storage", "sqlite:///notes.txt"], "cannot open this database"),
    (["-o", "reports"], "cannot write the report to reports"),
    (["-o", "notes.txt/report.html"], "is a file, not a folder"),
])
def test_bad_input_is_one_sentence_and_exit_2(real_search, tmp_path, args, fragment):
    shutil.copy(real_search / "cotune.db", tmp_path / "cotune.db")
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    (tmp_path / "reports").mkdir()
    result = run_cli("report", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_unwritable_path_is_a_user_error(fingerprint, tmp_path):
    info = report_info(fake_study(tmp_path, fingerprint, fake_run, budget=3))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        write_report(info, tmp_path / "file" / "report.html")
    with pytest.raises(UserError, match="cannot write the report to"):
        write_report(info, tmp_path)  # a folder, not a file


# --- studies a small real search rarely makes ----------------------------------------------------------------


def test_zero_ok_trials_still_make_a_readable_report(fingerprint, tmp_path):
    study = fake_study(tmp_path, fingerprint, always_failing, budget=8)
    info = report_info(study)
    assert info.ok.empty and info.picks.empty and info.knee is None and info.convergence is None
    statuses = [t.user_attrs["status"] for t in study.trials]
    assert info.status_counts == {s: statuses.count(s) for s in info.status_counts} and len(statuses) == 8
    assert {"oom", "timeout", "crash", "diverged"} <= set(statuses) and info.status_counts["ok"] == 0
    assert "No trial finished ok" in info.notes["pareto"]
    html = render(info)
    assert "No trial finished ok" in html and 'id="fig-pareto"' not in html
    assert html.count("<tr><td class=\"num\" data-v=") >= 8  # one failures row per trial
    assert "RuntimeError: oom &lt;b&gt;tag&lt;/b&gt;" in html  # error tails shown, and escaped


def test_single_objective_study(fingerprint, tmp_path):
    study = fake_study(tmp_path, fingerprint, fake_run, objectives=["val_loss"])
    info = report_info(study)
    assert info.pareto_numbers == [study.best_trial.number] and len(info.picks) == 1
    assert info.picks.iloc[0]["tags"] == ["best"] and info.knee is None
    assert info.convergence.kind == "best" and info.convergence.values[-1] == pytest.approx(study.best_value)
    assert info.importances is not None and list(info.importances.columns) == ["val_loss"]
    html = render(info)
    assert "single objective" in html and 'id="fig-pareto"' in html and 'id="fig-importance"' in html


def test_measured_baseline_gives_speedups_and_three_objectives_a_3d_front(fingerprint, tmp_path):
    # The first trial runs the space's baseline: enqueued params are what the sampler's suggestions return.
    study = fake_study(tmp_path, fingerprint, fake_run, enqueue=(dict(load_space(CPU_SPACE).baseline),),
                       objectives=["tokens_per_second", "val_loss", "peak_memory"])
    info = report_info(study)
    assert info.baseline_trial == 0 and "baseline" not in info.notes
    base = study.trials[0].user_attrs["metrics"]
    for _, p in info.picks.iterrows():
        assert p["speedup"] == pytest.approx(p["tokens_per_second"] / base["tokens_per_second"])
        assert p["loss_delta"] == pytest.approx(p["val_loss"] - base["val_loss"])
    assert set(info.extremes) == {"tokens_per_second", "val_loss", "peak_memory"}
    assert set(info.convergence.reference) == set(info.extremes)
    html = render(info)
    assert "speedup vs baseline" in html and "third objective" in html
    assert "speedup vs #0" in str([c.header for c in summary_table(info).columns])


def test_report_side_never_imports_torch():
    code = ("import sys, cotune.report.render, cotune.report.summary, cotune.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_ok_and_failed_trials_mixed(fingerprint, tmp_path):
    def flaky(config, trial_dir):
        number = int(trial_dir.name.rsplit("-", 1)[1])
        return fake_run(config, trial_dir) if number % 3 else always_failing(config, trial_dir)

    study = fake_study(tmp_path, fingerprint, flaky, budget=12)
    info = report_info(study)
    assert set(STATUSES) <= set(info.status_counts) and sum(info.status_counts.values()) == 12
    assert len(info.failures) == 12 - info.status_counts["ok"] > 0
    # A failed trial keeps the hypervolume where it was.
    c = info.convergence
    for n, before, after in zip(c.numbers[1:], c.values, c.values[1:]):
        if n in info.failures.index:
            assert after == before
    html = render(info)
    assert 'id="failures"' in html and 'id="fig-pareto"' in html


def test_fp16_trials_that_skipped_many_steps_are_flagged(tmp_path, fingerprint):
    def skipping(config: TrialConfig, trial_dir: Path) -> TrialResult:
        result = fake_run(config, trial_dir)
        number = int(trial_dir.name.rsplit("-", 1)[1])
        result.metrics.update(train_steps=40, fp16_skipped_steps={0: 1, 1: 10}.get(number, 0))  # 2.5% and 25%
        return result

    study = fake_study(tmp_path, fingerprint, skipping, budget=3)
    info = report_info(study)
    assert info.notes["fp16"].startswith("fp16 trials that skipped more than 5% of their optimizer steps on gradient "
                                         "overflow: #1 (25%).")
    assert "#0" not in info.notes["fp16"]
    assert "#1 (25%)" in render(info)
