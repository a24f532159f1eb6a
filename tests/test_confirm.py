"""Confirmation runs (`cotune confirm`): the statistics, which trials rerun and how they are stored, the report.

The statistics are checked against values worked out by hand; the engine against a study made by
the real search with a fast fake trial whose results depend on the seed; and the command end to
end on a real CPU study (slow).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import optuna
import pytest

from cotune import confirm, search
from cotune.config import TrialConfig, TrialResult
from cotune.report import figures, report_info
from cotune.report.render import render
from cotune.report.summary import confirmed_lines
from cotune.space import load_space
from cotune.study import distinct_configs, pareto_trials
from tests.conftest import CPU_SPACE, run_cli
from tests.test_cli import assert_user_error
from tests.test_report import fake_run

# --- the statistics ------------------------------------------------------------------------------------------

T_975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977987}  # Student t, two-sided 95%


def test_t_quantiles_are_students():
    for df, q in T_975.items():
        assert confirm.t_quantile(df) == pytest.approx(q, rel=1e-9)
    assert confirm.t_quantile(1e6) == pytest.approx(1.959964, rel=1e-5)  # the normal's, for many values
    assert T_975[2] < confirm.t_quantile(1.5) < T_975[1]  # Welch's fractional degrees of freedom


def test_summary_of_known_values():
    s = confirm.summarise([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert s.half_width == pytest.approx(T_975[2] / math.sqrt(3))
    assert (s.low, s.high) == pytest.approx((2 - 2.4841377, 2 + 2.4841377))
    one = confirm.summarise([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.std) and math.isnan(one.low)
    assert confirm.summarise([]).n == 0 and math.isnan(confirm.summarise([]).mean)
    assert one.to_dict() == {"n": 1, "mean": 5.0, "std": None, "low": None, "high": None}  # JSON without NaN


def test_speedup_interval_on_the_log_ratio():
    fast, slow = confirm.summarise([10.0, 12.0, 14.0]), confirm.summarise([5.0, 6.0, 7.0])
    r = confirm.ratio_interval(fast, slow)
    # Both sides: var(log mean) = s^2 / (n mean^2) = 1/108; Welch df = 4; se = sqrt(2/108).
    spread = T_975[4] * math.sqrt(2 / 108)
    assert r.value == 2.0
    assert (r.low, r.high) == pytest.approx((2 * math.exp(-spread), 2 * math.exp(spread)))
    assert (r.low, r.high) == pytest.approx((1.37070, 2.91822), abs=1e-5)
    assert r.low * r.high == pytest.approx(r.value**2)  # symmetric on the log scale
    same = confirm.summarise([3.0, 3.0])
    assert confirm.ratio_interval(same, same) == confirm.Ratio(1.0, 1.0, 1.0)
    single = confirm.ratio_interval(confirm.summarise([4.0]), slow)
    assert single.value == pytest.approx(4 / 6) and math.isnan(single.low)
    assert math.isnan(confirm.ratio_interval(confirm.summarise([]), slow).value)


def test_indistinguishable_means_overlap_on_every_objective():
    s = {
        1: {"tokens_per_second": confirm.summarise([100, 110, 120]), "val_loss": confirm.summarise([3.0, 3.1, 3.2])},
        2: {"tokens_per_second": confirm.summarise([115, 125, 135]), "val_loss": confirm.summarise([3.1, 3.2, 3.3])},
        3: {"tokens_per_second": confirm.summarise([500, 501, 502]), "val_loss": confirm.summarise([3.1, 3.2, 3.3])},
        4: {"tokens_per_second": confirm.summarise([100]), "val_loss": confirm.summarise([3.1])},  # no interval
    }
    assert confirm.overlap(s[1]["tokens_per_second"], s[2]["tokens_per_second"]) is True
    assert confirm.overlap(s[1]["tokens_per_second"], s[3]["tokens_per_second"]) is False
    assert confirm.overlap(s[1]["val_loss"], s[4]["val_loss"]) is None
    # 3 overlaps 2 on loss but not on throughput; 4 cannot be told from anything.
    assert confirm.indistinguishable(s, ["tokens_per_second", "val_loss"]) == [(1, 2)]
    assert confirm.indistinguishable(s, ["val_loss"]) == [(1, 2), (1, 3), (2, 3)]


def test_rerun_seeds_differ_from_the_original_and_each_other():
    seeds = [confirm.rerun_seed(7, k) for k in (1, 2, 3)]
    assert seeds == [1007, 2007, 3007] and 7 not in seeds


# --- the engine, with a fast fake trial ----------------------------------------------------------------------


def noisy_run(config: TrialConfig, trial_dir: Path) -> TrialResult:
    """fake_run's trade-off, with a few per cent of throughput and a little loss that depend on the seed."""
    result = fake_run(config, trial_dir)
    wobble = (config.run.seed // 1000) % 3 - 1  # -1, 0 or 1: the reruns (seed + 1000 k) differ
    result.metrics["tokens_per_second"] *= 1 + 0.04 * wobble
    result.metrics["val_loss"] += 0.01 * wobble
    return result


def seeded_study(tmp_path: Path, fingerprint: dict, budget: int = 10) -> optuna.Study:
    """A study the real search engine made with its baseline as trial 0 and ``noisy_run`` as the trial."""
    space = load_space(CPU_SPACE)
    settings = search.SearchSettings(
        space=space, space_path=str(CPU_SPACE), objectives=list(space.objectives), budget=budget,
        fingerprint=fingerprint, vocab_size=256, runs_dir=tmp_path / "runs", seed=5,
        world_size=search.check_hardware(space, str(CPU_SPACE), fingerprint),
    )
    study = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'seeded.db'}"), "seeded", settings)
    assert search.enqueue_baseline(study, settings) == ""
    search.run_search(study, settings, noisy_run)
    return study


def test_confirm_reruns_baseline_and_front_and_resumes(tmp_path, fingerprint):
    study = seeded_study(tmp_path, fingerprint)
    trials_before = len(study.get_trials())
    front = [t.number for t in distinct_configs(pareto_trials(study))]
    ran: list[tuple[int, int]] = []

    def run_fn(config, folder):
        ran.append((int(folder.name.split("-")[1]), config.run.seed))
        assert not config.run.profile
        return noisy_run(config, folder)

    found, skipped = confirm.confirm_study(study, run_fn, tmp_path / "runs", repeats=2)
    assert skipped == []
    assert found[0].number == 0 and "baseline" in found[0].roles  # the baseline first
    assert sorted(t.number for t in found) == sorted({0, *front})
    # Rounds: every target's first rerun before any second one; each with the original seed + 1000 k.
    assert [seed for _, seed in ran] == [1005] * len(found) + [2005] * len(found)
    held = confirm.confirmations(study)
    assert sorted(held) == sorted(t.number for t in found)
    for number, entry in held.items():
        assert [r["seed"] for r in entry["runs"]] == [1005, 2005] and entry["original_seed"] == 5
        assert all(r["status"] == "ok" and r["tokens_per_second"] > 0 for r in entry["runs"])
        assert entry["summary"]["val_loss"]["n"] == 2 and entry["original_counted"] is False
        assert entry["runs"][0]["folder"].endswith(f"confirm-{number:04d}-seed1005")
    # Reruns are not trials: the sampler and the budget never see them.
    assert len(study.get_trials()) == trials_before
    # Run again: nothing new; ask for a third rerun: only that one per target.
    ran.clear()
    confirm.confirm_study(study, run_fn, tmp_path / "runs", repeats=2)
    assert ran == [] and confirm.confirmations(study) == held
    confirm.confirm_study(study, run_fn, tmp_path / "runs", repeats=3)
    assert [seed for _, seed in ran] == [3005] * len(found)
    assert all(len(e["runs"]) == 3 for e in confirm.confirmations(study).values())


def test_a_failed_rerun_is_recorded_not_raised(tmp_path, fingerprint):
    study = seeded_study(tmp_path, fingerprint, budget=4)

    def run_fn(config, folder):
        if config.run.seed == 2005:
            return TrialResult(status="oom", reason="out of memory on purpose", error_tail="RuntimeError: OOM")
        return noisy_run(config, folder)

    confirm.confirm_study(study, run_fn, tmp_path / "runs", repeats=2)
    baseline = confirm.confirmations(study)[0]
    failed = baseline["runs"][1]
    assert (failed["seed"], failed["status"], failed["reason"]) == (2005, "oom", "out of memory on purpose")
    assert failed["tokens_per_second"] is None
    assert baseline["summary"]["tokens_per_second"]["n"] == 1  # only the ok rerun counts
    # The failure counts as a rerun: running again does not retry it.
    assert confirm.planned(study, confirm.targets(study)[0], 2) == []


def test_report_of_a_confirmed_study(tmp_path, fingerprint):
    study = seeded_study(tmp_path, fingerprint)
    before = report_info(study)
    assert before.confirmed is None and "cotune confirm" in before.notes["confirm"]
    assert "cotune confirm" in confirmed_lines(before)[0]
    assert "cotune confirm" in render(before)
    confirm.confirm_study(study, noisy_run, tmp_path / "runs", repeats=3)
    info = report_info(study)
    c = info.confirmed
    assert c is not None and c.baseline == info.baseline_trial == 0
    assert set(c.summaries) == {0, *info.picks["number"]}
    for n in info.picks["number"]:
        if n == 0:
            continue
        s, b = c.summaries[n]["tokens_per_second"], c.summaries[0]["tokens_per_second"]
        assert c.speedups[n].value == pytest.approx(s.mean / b.mean)
        assert c.speedups[n].low < c.speedups[n].value < c.speedups[n].high
    lines = confirmed_lines(info)  # `cotune report --summary`
    assert lines[0].startswith("confirmed speedup over baseline #0 (95% interval): #")
    assert any(line.startswith("baseline val loss from seed to seed: std") for line in lines)
    html = render(info)
    assert "Confirmed with other seeds" in html and "Seed-to-seed spread of the baseline" in html
    assert re.search(r"\d\.\d\d× \(\d\.\d\d–\d\.\d\d\)", html)  # a speedup with its interval
    bars = [t for t in figures.pareto(info).data if t.meta == "confirmed"]
    assert bars and all(t.error_x.array is not None and t.error_y.array is not None for t in bars)


# --- the command, end to end --------------------------------------------------------------------------------


def test_confirm_flags(tmp_path):
    assert_user_error(run_cli("confirm", cwd=tmp_path), "no database file")
    assert_user_error(run_cli("confirm", "--repeats", "0", cwd=tmp_path), "--repeats", "greater than or equal to 1")
    optuna.create_study(study_name="a", storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    assert_user_error(run_cli("confirm", "--study", "b", cwd=tmp_path), "--study 'b' is not in")


@pytest.mark.slow
def test_confirm_a_real_study(real_search, tmp_path):
    shutil.copy(real_search / "cotune.db", tmp_path / "cotune.db")
    storage = f"sqlite:///{tmp_path / 'cotune.db'}"
    study = optuna.load_study(study_name="cpu-tiny-gpt", storage=storage)
    trials = {t.number: t for t in study.get_trials()}
    first = run_cli("confirm", "--repeats", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    # Forked from a fork server, as the search's trials are (a server that failed would say so on stderr).
    assert (tmp_path / "cotune-runs" / "cpu-tiny-gpt" / "fork-server.log").exists()
    assert "fork server" not in first.stderr, first.stderr
    held = confirm.confirmations(optuna.load_study(study_name="cpu-tiny-gpt", storage=storage))
    assert 0 in held and trials[0].user_attrs["baseline"]  # the baseline, trial 0, is confirmed
    assert set(held) == {0, *(t.number for t in distinct_configs(pareto_trials(study)))}
    for number, entry in held.items():
        original = trials[number].user_attrs["config"]["run"]["seed"]
        seeds = [r["seed"] for r in entry["runs"]]
        assert len(set(seeds)) == 2 and original not in seeds, seeds
        assert all(r["status"] == "ok" for r in entry["runs"]), entry["runs"]
        for r in entry["runs"]:
            folder = tmp_path / r["folder"]
            ran = TrialConfig.load(folder / "config.json")
            assert ran.run.seed == r["seed"] and (folder / "result.json").exists()
    assert first.stdout.count("confirm [") == sum(len(e["runs"]) for e in held.values())  # a line per rerun
    assert len(optuna.load_study(study_name="cpu-tiny-gpt", storage=storage).get_trials()) == len(trials)

    again = run_cli("confirm", "--repeats", "2", "--report", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to run" in again.stdout and "confirm [" not in again.stdout
    assert confirm.confirmations(optuna.load_study(study_name="cpu-tiny-gpt", storage=storage)) == held
    html = (tmp_path / "reports" / "cpu-tiny-gpt.html").read_text()
    assert "Confirmed with other seeds" in html and "Seed-to-seed spread of the baseline" in html
    assert re.search(r"\d\.\d\d× \(\d+\.\d\d–\d+\.\d\d\)", html), "no speedup interval in the report"

    # `search --confirm` on a study whose budget is spent goes straight to confirming: the third reruns.
    more = run_cli("search", "--budget", "4", "--seed", "1", "--confirm", cwd=tmp_path)
    assert more.returncode == 0, more.stdout + more.stderr
    final = confirm.confirmations(optuna.load_study(study_name="cpu-tiny-gpt", storage=storage))
    assert all(len(e["runs"]) == 3 and len({r["seed"] for r in e["runs"]}) == 3 for e in final.values())
