"""Time to a target loss: the estimate from a trial's curves, the target a study keeps, the objective it records."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from cotune import search
from cotune.config import TrialConfig, TrialResult
from cotune.time_to_loss import estimated_val_curve, time_to_loss
from tests.test_search import settings, study_for

OBJ = ["tokens_per_second", "val_loss", "time_to_loss"]


def curve(losses: list[float]) -> list[list[float]]:
    return [[i + 1, 64 * (i + 1), v] for i, v in enumerate(losses)]


def test_the_estimate_ends_on_the_measured_validation_loss_and_follows_the_training_curve():
    losses = [5.0 - 0.1 * i for i in range(40)]  # 5.0 down to 1.1
    est = estimated_val_curve(curve(losses), val_loss=1.5)
    assert est[-1] == (40, pytest.approx(1.5))
    assert all(a[1] > b[1] for a, b in zip(est, est[1:]))  # a falling curve stays falling when shifted
    seconds, steps = time_to_loss(curve(losses), 1.5, step_time_s=0.25, target=2.0)
    assert steps == next(s for s, v in est if v <= 2.0) and seconds == steps * 0.25 and steps < 40
    assert time_to_loss(curve(losses), 1.5, 0.25, target=1.0) == (math.inf, None)  # never got there
    assert estimated_val_curve(curve(losses), math.nan) == []


def timed_trial(config: TrialConfig, trial_dir: Path) -> TrialResult:
    """Loss falls faster with a higher learning rate (up to 1e-2); step time grows with the global batch."""
    k = config.flat()
    rate = min(k["learning_rate"], 1e-2) * 30
    losses = [5.5 * math.exp(-rate * i / 10) + 2.0 for i in range(60)]
    return TrialResult("ok", metrics={"tokens_per_second": 1000.0 * k["micro_batch_size"], "val_loss": losses[-1] + 0.05,
                                      "step_time_mean_s": 0.001 * k["global_batch_size"]},
                       loss_curve=curve(losses))


def test_the_baseline_sets_the_target_and_every_ok_trial_records_its_time_to_it(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=10, objectives=OBJ)
    study = study_for(tmp_path, s)
    assert search.enqueue_baseline(study, s) == ""
    search.run_search(study, s, timed_trial)
    base = study.trials[0]
    target = study.user_attrs["loss_target"]
    assert target == {"value": base.user_attrs["metrics"]["val_loss"], "source": "the baseline's (trial 0)"}
    for t in study.trials:
        m = t.user_attrs["metrics"]
        assert m["loss_target"] == target["value"] and t.values[2] == (math.inf if m["time_to_loss_s"] == "inf"
                                                                       else m["time_to_loss_s"])
        if m["val_loss"] > target["value"]:
            assert m["time_to_loss_s"] == "inf" and m["steps_to_loss"] is None
        else:
            assert m["time_to_loss_s"] == pytest.approx(m["steps_to_loss"] * m["step_time_mean_s"])
    assert base.values[2] <= 60 * base.user_attrs["metrics"]["step_time_mean_s"]


def test_a_space_target_wins_and_without_any_target_the_search_says_so(fingerprint, tmp_path):
    from cotune.errors import UserError

    s = settings(fingerprint, tmp_path, budget=3, objectives=OBJ)
    with_target = s.space.model_copy(update={"loss_target": 2.5})
    st = settings(fingerprint, tmp_path, budget=3, objectives=OBJ, space=with_target)
    study = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'a.db'}"), "a", st)
    search.run_search(study, st, timed_trial)
    assert study.user_attrs["loss_target"] == {"value": 2.5, "source": "the space's loss_target"}
    assert all(t.user_attrs["metrics"]["loss_target"] == 2.5 for t in study.trials)

    bare = study_for(tmp_path, s)  # no baseline queued, no target
    with pytest.raises(UserError, match="time_to_loss objective needs a target loss; set loss_target"):
        search.run_search(bare, s, timed_trial)
    assert bare.trials == []


def test_the_report_shows_time_to_loss_as_an_objective(fingerprint, tmp_path):
    from cotune.report import report_info
    from cotune.report.render import render

    s = settings(fingerprint, tmp_path, budget=8, objectives=OBJ)
    study = study_for(tmp_path, s)
    search.enqueue_baseline(study, s)
    search.run_search(study, s, timed_trial)
    html = render(report_info(study))
    assert "Time to loss is an objective here" in html and "the baseline&#x27;s (trial 0)" in html


def test_cli_rejects_time_to_loss_without_a_target(tmp_path):
    from tests.conftest import CPU_SPACE, run_cli

    text = CPU_SPACE.read_text()
    bare = tmp_path / "bare.yaml"
    bare.write_text(text[:text.index("baseline:")])
    out = run_cli("search", "--space", str(bare), "--objectives", "throughput,loss,time_to_loss", "--budget", "1",
                  cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "time_to_loss objective needs a target loss; set loss_target:" in out.stderr
    assert not (tmp_path / "cotune.db").exists()


def test_a_target_never_reached_is_the_worst_value_in_the_front_analysis():
    import numpy as np

    from cotune.report import analysis

    # minimised (-tokens/s, loss, time to loss): the fastest never reaches the target
    points = np.array([[-100.0, 2.0, np.inf], [-50.0, 1.5, 4.0], [-80.0, 1.8, 3.0]])
    z = analysis.normalised(points)
    assert np.isfinite(z).all() and z[0, 2] == 1.0 and z[2, 2] == 0.0
    assert analysis.knee(points) == 2
    ideal, reference = analysis.reference_box(points)
    assert np.isfinite(reference).all() and reference[2] > 4.0
    assert analysis.hypervolume(points, reference) > 0


def test_confirmation_reruns_count_their_time_to_the_studys_target(fingerprint, tmp_path):
    from cotune import confirm

    s = settings(fingerprint, tmp_path, budget=6, objectives=OBJ)
    study = study_for(tmp_path, s)
    search.enqueue_baseline(study, s)
    search.run_search(study, s, timed_trial)
    confirm.confirm_study(study, timed_trial, tmp_path / "runs", repeats=2)
    entries = confirm.confirmations(study)
    assert entries and 0 in entries
    base = study.trials[0].user_attrs["metrics"]
    for run in entries[0]["runs"]:  # the baseline's reruns train the same curve: the same time as the original
        assert run["time_to_loss_s"] == pytest.approx(float(base["time_to_loss_s"]))
    assert entries[0]["summary"]["time_to_loss_s"]["n"] == 2
