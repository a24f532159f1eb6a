"""The report in a real headless Chromium: it renders offline, without errors, and shows the study's data.

Needs Debian's ``chromium`` (/usr/bin/chromium) and Playwright's Python package; Playwright's
own browser downloads are never used. Skipped, with the reason, where either is missing,
except in CI (CI=true), where they must run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import optuna
import pytest

from cotune import confirm, search
from cotune.config import TrialResult
from cotune.report import report_info
from cotune.report.render import write_report
from cotune.space import load_space
from cotune.study import distinct_configs, pareto_trials
from tests.conftest import CPU_SPACE
from tests.test_confirm import noisy_run, seeded_study
from tests.test_report import always_failing, fake_run, fake_study

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]

# Off CI, a machine without Chromium skips these; in CI (which installs it) they must run.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                       reason="needs Debian's chromium: apt-get install -y chromium"),
]


def open_page(html: Path, screenshot: Path):
    """Load ``html`` in headless Chromium; return (page facts, console errors, requests made).

    Every request is recorded; anything but the file itself is refused, so a page that
    tried to reach the network both shows up in the list and cannot hang the test.
    """
    if os.environ.get("CI"):
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright's Python package")
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def route(r):
                requests.append(r.request.url)
                if r.request.url == html.as_uri():
                    r.continue_()
                else:
                    r.abort()

            page.route("**/*", route)
            page.goto(html.as_uri(), wait_until="load")
            page.wait_for_timeout(500)  # let plotly finish drawing before the screenshot
            facts = page.evaluate("""() => {
                const fig = document.getElementById('fig-pareto');
                const front = fig ? fig.data.filter(t => t.meta === 'pareto') : [];
                return {
                    pareto_points: front.length ? front[0].x.length : null,
                    confirmed_points: fig ? fig.data.filter(t => t.meta === 'confirmed')
                        .reduce((k, t) => k + t.x.length, 0) : 0,
                    error_bars: fig ? fig.querySelectorAll('path.xerror, path.yerror').length : 0,
                    confirmed_rows: document.querySelectorAll('#confirmed tbody tr').length,
                    pick_rows: document.querySelectorAll('#picks tbody tr').length,
                    failure_rows: document.querySelectorAll('#failures tbody tr').length,
                    plots: document.querySelectorAll('.js-plotly-plot').length,
                    title: document.title,
                    pwned: window.__pwned === undefined ? null : window.__pwned,
                    bold: Array.from(document.querySelectorAll('b')).filter(b => b.textContent === 'bold').length,
                    text: document.body.innerText,
                };
            }""")
            if facts["pick_rows"] > 1:  # sorting by validation loss puts the lowest first
                page.click("#picks thead th:nth-child(4)")
                facts["sorted_losses"] = page.eval_on_selector_all(
                    "#picks tbody tr td:nth-child(4)", "cells => cells.map(c => parseFloat(c.dataset.v))")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return facts, errors, requests


@pytest.mark.slow
def test_real_study_report_in_chromium(real_search, tmp_path):
    # The page `cotune search --report` wrote, opened from a copy of its folder.
    html = tmp_path / "report.html"
    shutil.copy(real_search / "reports" / "cpu-tiny-gpt.html", html)
    study = optuna.load_study(study_name="cpu-tiny-gpt", storage=f"sqlite:///{real_search / 'cotune.db'}")
    facts, errors, requests = open_page(html, tmp_path / "report.png")
    assert errors == []
    assert requests == [html.as_uri()]  # the page itself, nothing else
    assert facts["pareto_points"] == len(study.best_trials)
    assert facts["pick_rows"] == len(distinct_configs(pareto_trials(study)))
    assert facts["plots"] >= 5 and "cpu-tiny-gpt" in facts["title"]
    if "sorted_losses" in facts:
        assert facts["sorted_losses"] == sorted(facts["sorted_losses"])
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_confirmed_report_draws_error_bars_in_chromium(fingerprint, tmp_path):
    study = seeded_study(tmp_path, fingerprint)
    confirm.confirm_study(study, noisy_run, tmp_path / "runs", repeats=3)
    info = report_info(study)
    html = write_report(info, tmp_path / "confirmed.html")
    facts, errors, requests = open_page(html, tmp_path / "confirmed.png")
    assert errors == [] and requests == [html.as_uri()]
    confirmed = len(info.confirmed.summaries)
    assert confirmed >= 2 and facts["confirmed_points"] == confirmed and facts["confirmed_rows"] == confirmed
    # Every confirmed point has an interval on both axes, so plotly draws two bars for each.
    assert facts["error_bars"] == 2 * confirmed


def test_report_with_nothing_ok_in_chromium(fingerprint, tmp_path):
    study = fake_study(tmp_path, fingerprint, always_failing, budget=6)
    html = write_report(report_info(study), tmp_path / "failed.html")
    facts, errors, requests = open_page(html, tmp_path / "failed.png")
    assert errors == [] and requests == [html.as_uri()]
    assert facts["pareto_points"] is None and facts["pick_rows"] == 0
    assert facts["failure_rows"] == 6


# Markup that runs, or fetches, if any string reaches the page unescaped: in text, in an attribute, in a
# figure's JSON inside a <script>, or in the <title>.
PAYLOAD = ('</title></script><script>window.__pwned = 1</script>'
           '<img src="x" onerror="window.__pwned = 2">"\'><b>bold</b>')


def test_hostile_strings_in_a_study_are_shown_as_text_in_chromium(fingerprint, tmp_path):
    # The strings a user controls, or that come from their machine or their trials: the study name, the
    # space's path and its data path (in every trial's config), the data source, the CPU model, and a failed
    # trial's reason and error tail.
    space = load_space(CPU_SPACE)
    hostile = space.model_copy(update={"workload": space.workload.model_copy(update={"data": f"data/{PAYLOAD}.txt"})})
    fp = {**fingerprint, "hardware": {**fingerprint["hardware"], "cpu_model": PAYLOAD}}
    settings = search.SearchSettings(
        space=hostile, space_path=f"spaces/{PAYLOAD}.yaml", objectives=list(space.objectives), budget=6,
        fingerprint=fp, vocab_size=256, runs_dir=tmp_path / "runs", seed=0, data={"source": PAYLOAD},
        world_size=search.check_hardware(space, str(CPU_SPACE), fingerprint))

    def run(config, trial_dir):
        if int(trial_dir.name.rsplit("-", 1)[1]) % 2:
            return TrialResult(status="crash", reason=PAYLOAD, error_tail=f"RuntimeError: {PAYLOAD}")
        return fake_run(config, trial_dir)

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hostile.db'}")
    study = search.create_or_resume_study(storage, PAYLOAD, settings)
    search.run_search(study, settings, run)
    html = write_report(report_info(study), tmp_path / "hostile.html")
    facts, errors, requests = open_page(html, tmp_path / "hostile.png")
    assert errors == []
    assert requests == [html.as_uri()]  # the <img> was never made, so it fetched nothing
    assert facts["pwned"] is None and facts["bold"] == 0  # no script ran, no markup was parsed
    assert PAYLOAD in facts["title"]  # shown as the text it is
    assert facts["text"].count(PAYLOAD) >= 4  # heading, data path, CPU model, failures table
    assert facts["pareto_points"] and facts["failure_rows"] == 3
