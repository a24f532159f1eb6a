"""``render(info) -> str``: the report as one self-contained HTML page; ``write_report`` saves it.

The page needs nothing from the network: plotly.js is embedded once in the head,
the CSS and the few lines of table-sorting script are inline.
"""

from __future__ import annotations

import json
from pathlib import Path

from plotly.offline import get_plotlyjs, get_plotlyjs_version

from cotune.display import fmt
from cotune.errors import UserError
from cotune.labels import TABLE_METRICS, label
from cotune.report import figures, text
from cotune.report.baseline import differences
from cotune.report.info import ReportInfo
from cotune.report.page import cell, document, e, figure, key_values, note, section, table

NAV = [("pareto", "Pareto front"), ("pick", "What to pick"), ("convergence", "Convergence"), ("why", "Why"),
       ("pruned", "Stopped early"), ("failed", "What failed"), ("kernels", "Kernels"), ("where", "Where it ran"), ("depth", "Trials in depth")]


def render(info: ReportInfo) -> str:
    """The report page for ``info``."""
    figs = {
        "pareto": figures.pareto(info), "convergence": figures.convergence(info),
        "importance": figures.importance(info), "parallel": figures.parallel(info),
        "loss": figures.loss_curves(info), "steps": figures.step_times(info), "phases": figures.phases(info),
    }
    body = "".join([
        _pareto(info, figs), _pick(info), _convergence(info, figs), _why(info, figs), _pruned(info), _failed(info),
        _kernels(info), _where(info), _depth(info, figs),
    ])
    any_figure = any(f is not None for f in figs.values())
    footer = (f"cotune {e(info.run.get('cotune_version') or '')} report of study {e(info.study_name)}, "
              f"made {e(info.run['created'])}. Self-contained: plotly.js {get_plotlyjs_version()} is embedded, "
              "nothing is fetched from the network.")
    space = info.run.get("space_name") or "unknown space"
    subtitle = e(f"study {info.study_name} · space {space}" + (f" — {info.run['description']}"
                                                               if info.run.get("description") else ""))
    shown = {"kernels": not info.kernels.empty, "pruned": bool(info.status_counts.get("pruned"))}
    nav = [(a, t) for a, t in NAV if shown.get(a, True)]
    return document(f"cotune report: {info.study_name}", subtitle, nav, _cards(info), body, footer,
                    get_plotlyjs() if any_figure else "")


def write_report(info: ReportInfo, path: Path) -> Path:
    """Render and write the page to ``path`` (its folder is created); a path that cannot be written is a UserError."""
    html = render(info)
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"cannot write the report to {path}: {path.parent} is a file, not a folder; "
                        "give a writable file path with -o")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html, encoding="utf-8")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"cannot write the report to {path} ({reason}); give a writable file path with -o") from None
    return path


def _card(key: str, value: str, sub: str = "", cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="k">{e(key)}</div><div class="v">{e(value)}</div>'
            f'<div class="s">{e(sub)}</div></div>')


def _cards(info: ReportInfo) -> str:
    counts = info.status_counts
    failed = sum(v for k, v in counts.items() if k not in ("ok", "pruned"))
    pruned = f"{counts['pruned']} stopped early, " if counts.get("pruned") else ""
    cards = [_card("trials", str(len(info.frame)), f"{counts.get('ok', 0)} ok, {pruned}{failed} not ok")]
    cards.append(_card("Pareto configs", str(len(info.picks)), f"of {len(info.pareto_numbers)} Pareto trials"))
    for o in info.objectives:
        if o.name in info.extremes:
            n = info.extremes[o.name]
            value = info.frame.at[n, o.metric]
            shown = _value(o.name, value)
            cards.append(_card(f"best {o.label}", shown, f"trial {n}"))
    if info.knee is not None:
        k = info.frame.loc[info.knee]
        cards.append(_card("knee", f"#{info.knee}", f"{text.tokens(k['tokens_per_second'])} tok/s · "
                                                    f"loss {text.loss(k['val_loss'])}", "knee"))
    if info.convergence is not None:
        verdict = info.convergence.verdict
        word = "improving" if "Still improving" in verdict else "flattening" if "Flattening" in verdict else "too early"
        cards.append(_card("convergence", word, f"last gain at trial {info.convergence.improved_at[-1]}"
                           if info.convergence.improved_at else ""))
    return f'<div class="cards">{"".join(cards)}</div>'


def _pareto(info: ReportInfo, figs: dict) -> str:
    counts = info.status_counts
    bad = {k: v for k, v in counts.items() if k != "ok" and v}
    n_ok = counts.get("ok", 0)
    parts = []
    if not info.ok.empty:
        failed = (f"{sum(bad.values())} trials that did not finish ok are not plotted ("
                  + ", ".join(f"{k} {v}" for k, v in bad.items())
                  + ("; see Stopped early and What failed)." if "pruned" in bad else "; see What failed).") if bad
                  else "Every trial finished ok.")
        memory = " coloured by peak memory," if info.ok["peak_memory_bytes"].notna().all() else ""
        token_budget = info.run.get("trial", {}).get("token_budget")
        after = f" after {token_budget:,} training tokens" if token_budget else ""
        front = (f"The {len(info.pareto_numbers)} Pareto-optimal trials (Optuna's <code>study.best_trials</code>) "
                 f"are in colour,{memory} the {n_ok - len(info.pareto_numbers)} dominated ones faded."
                 if len(info.objectives) > 1 else "The best trial is in colour, the others faded.")
        parts.append(
            f"<p>Each point is one of the {n_ok} trials that finished ok: throughput against validation loss{after}. "
            f"{front} {e(failed)} Hover a point for its full config.</p>")
        if info.knee is not None:
            parts.append("<p>The <b>knee</b> is the best trade-off: with each objective scaled to [0, 1] over the "
                         "front, the point farthest past the line joining the extremes (or, where the front does "
                         "not bend, the one nearest the ideal corner).</p>")
        if any(o.name == "peak_memory" for o in info.objectives):
            parts.append(note("Peak memory is a third objective here: a point can be Pareto-optimal because it "
                              "uses less memory while looking dominated in this throughput–loss view.", "info"))
        if any(o.name == "time_to_loss" for o in info.objectives):
            target = info.run.get("loss_target") or {}
            parts.append(note(
                f"Time to loss is an objective here: the training seconds to reach validation loss "
                f"{text.loss(target.get('value'))} ({target.get('source', 'no target recorded')}), from the training "
                "curve shifted onto the final validation loss and the measured step time; a point can be "
                "Pareto-optimal because it gets there first while looking dominated in this view.", "info"))
    parts.append(note(info.notes.get("pareto", "")))
    parts.append(figure(figs["pareto"], "fig-pareto", ""))
    parts.append(_noise(info))
    return section("pareto", "Pareto front: throughput against validation loss", "".join(parts))


def _convergence(info: ReportInfo, figs: dict) -> str:
    c = info.convergence
    parts = []
    if c is not None and c.kind == "hypervolume":
        ref = ", ".join(f"{o.label} {_value(o.name, c.reference[o.name])}" for o in info.objectives)
        ideal = ", ".join(f"{o.label} {_value(o.name, c.ideal[o.name])}" for o in info.objectives)
        parts.append(
            "<p>Hypervolume of the front after each trial: the share of the box between the ideal point "
            f"(<b>{e(ideal)}</b>: the best value of each objective seen) and the reference point "
            f"(<b>{e(ref)}</b>: the worst value of each objective over the ok trials, pushed 10% of its range "
            "further) that the front dominates. A curve that keeps rising says more budget still finds better "
            "trade-offs; a flat tail says the sampler has stopped finding them in this space.</p>")
    elif c is not None:
        parts.append(f"<p>Best {e(info.objectives[0].label)} after each trial (a single objective has no "
                     "hypervolume).</p>")
    if c is not None:
        parts.append(note(c.verdict, "verdict"))
    parts.append(note(info.notes.get("convergence", "") or ("" if c else info.notes.get("pareto", ""))))
    parts.append(figure(figs["convergence"], "fig-convergence", ""))
    return section("convergence", "Convergence: would more budget help?", "".join(parts))


def _why(info: ReportInfo, figs: dict) -> str:
    parts = [
        "<h3>Knob importance per objective</h3>",
        f"<p>Optuna's PED-ANOVA importance evaluator, once per objective: how differently each knob is spread among "
        f"the best 10% of the {len(info.ok)} ok trials than among all of them. Each objective's bars sum to 100%; "
        "with few trials, small differences are noise.</p>" if info.importances is not None else "",
        note(info.notes.get("importance", "")),
        figure(figs["importance"], "fig-importance", ""),
        "<h3>Knobs against objectives</h3>",
        "<p>Every ok trial as one line through its knob values and its results, coloured by validation loss. "
        "Drag along any axis to keep only the lines passing there.</p>" if figs["parallel"] is not None else "",
        figure(figs["parallel"], "fig-parallel", "The parallel-coordinates view needs at least two ok trials and a "
                                                 "knob that varies."),
    ]
    return section("why", "Why: which knobs matter", "".join(parts))


def _value(objective: str, value: float) -> str:
    return {"tokens_per_second": text.tokens, "val_loss": text.loss, "peak_memory": text.mib,
            "time_to_loss": text.seconds}[objective](value)


def _pick(info: ReportInfo) -> str:
    parts = []
    base = ", ".join(f"{text.knob(k)} {fmt(info.baseline[k])}" for k in info.baseline_declared if k in info.baseline)
    if info.baseline_trial is not None:
        b = info.frame.loc[info.baseline_trial]
        parts.append(f"<p>Baseline (the space's <code>baseline:</code>): <span class=chg>{e(base)}</span>, measured in "
                     f"trial {info.baseline_trial}: {e(text.tokens(b['tokens_per_second']))} tokens/s, val loss "
                     f"{e(text.loss(b['val_loss']))}, {e(text.mib(b['peak_memory_bytes']))}.</p>")
    elif base:
        parts.append(f"<p>Baseline (the space's <code>baseline:</code>): <span class=chg>{e(base)}</span>.</p>")
    if info.picks.empty:
        parts.append(note(info.notes.get("pareto", "No Pareto configs.")))
        return section("pick", "What to pick: the Pareto configs", "".join(parts))
    parts.append(note(info.notes.get("baseline", "")))
    parts.append(note(info.notes.get("fp16", "")))
    parts.append(f"<p>One row per distinct Pareto-optimal config ({len(info.picks)}), fastest first. Click a "
                 "header to sort. The knee row is highlighted.</p>" if len(info.objectives) > 1 else
                 "<p>The best config of this single-objective study.</p>")
    reusing = [n for n, m in info.ok["measured"].items() if text.reused(m)]
    if reusing:
        parts.append(f"<p>{len(reusing)} of the {len(info.ok)} ok trials took a value another trial measured: a "
                     "throughput measured on the same system knobs, batch, precision and kernels, or an fp32 loss "
                     "trained with the same batch, optimizer settings, kernels and seed on a layout the equivalence "
                     "gate holds to the same loss. A pill names the trial each came from.</p>")
    measured = info.baseline_trial is not None  # without a measured baseline there is no speedup to show
    headers = ["trial", "", *(label(m) for m in TABLE_METRICS),
               *(["speedup vs baseline", "Δ loss vs baseline"] if measured else []), "changed from baseline"]
    rows, classes = [], []
    for n, p in info.picks.iterrows():
        tags = "".join(f'<span class="pill{" knee" if t == "knee" else ""}">{e(t)}</span>' for t in p["tags"])
        if p["repeats"] > 1:
            tags += f'<span class="pill zero">{int(p["repeats"])} trials</span>'
        tags += "".join(f'<span class="pill zero">{e(w)}</span>' for w in text.reused(info.frame.at[n, "measured"]))
        changed = " ".join(f'<span class="chg">{e(text.change(k, b, v))}</span>' for k, b, v in p["differs"])
        versus = [cell(text.ratio(p["speedup"]), p["speedup"], numeric=True),
                  cell(text.signed(p["loss_delta"]), p["loss_delta"], numeric=True)] if measured else []
        rows.append([
            cell(f"#{n}", n, numeric=True), cell(tags, raw=True),
            cell(text.tokens(p["tokens_per_second"]), p["tokens_per_second"], numeric=True),
            cell(text.loss(p["val_loss"]), p["val_loss"], numeric=True),
            cell(text.mib(p["peak_memory_bytes"]), p["peak_memory_bytes"], numeric=True),
            cell(text.percent(p["mfu"]), p["mfu"], numeric=True), *versus,
            cell(changed or "same as baseline", len(p["differs"]), raw=bool(changed), cls="changes"),
        ])
        classes.append("knee" if n == info.knee else "")
    numeric = {0, 2, 3, 4, 5, 6, 7} if measured else {0, 2, 3, 4, 5}
    parts.append(table(headers, rows, id="picks", sortable=True, numeric=numeric, row_classes=classes))
    parts.append(_confirmed_table(info))
    sources = ", ".join(info.run.get("peak_flops_sources") or []) or "not recorded"
    parts.append(f"<p class=\"s\">MFU is model FLOPs per token × tokens/s ÷ peak FLOP/s; the peak here comes from: "
                 f"{e(sources)}. Memory: {e(', '.join(info.run.get('peak_memory_sources') or []) or 'not recorded')}."
                 "</p>")
    return section("pick", "What to pick: the Pareto configs", "".join(parts))


def _noise(info: ReportInfo) -> str:
    """Next to the front: how large the seed-to-seed noise is (the confirmation runs), or how to measure it."""
    c = info.confirmed
    if c is None:
        return note(info.notes.get("confirm", ""), "info") if not info.ok.empty else ""
    parts = [f"<p>Open circles with error bars are the confirmation runs (<code>cotune confirm</code>): a config's "
             f"mean over its reruns with other training seeds, and the {c.level:.0%} interval of that mean "
             "(Student t, n − 1 degrees of freedom). The search's own run of a config is not counted: it was put "
             "on the front for looking good, which would pull the mean toward luck.</p>"]
    base = c.summaries.get(c.baseline) if c.baseline is not None else None
    if base is not None and base["val_loss"].n >= 2:
        loss = base["val_loss"]
        parts.append(note(f"Seed-to-seed spread of the baseline's validation loss: standard deviation {loss.std:.4f} "
                          f"over {loss.n} seeds (mean {text.mean_interval(loss, text.loss)}). Loss differences "
                          "between single runs of about this size are noise, not the config.", "verdict"))
    elif c.baseline is None:
        parts.append(note("The baseline has no confirmation runs, so its seed-to-seed loss spread and the speedup "
                          "intervals are not shown; run `cotune confirm` to add them."))
    confirmed_picks = [n for n in info.picks["number"] if n in c.summaries]
    objectives = " and ".join(o.label for o in info.objectives)
    if c.same_within_noise:
        listed = "; ".join(f"#{a} and #{b}" for a, b in c.same_within_noise)
        parts.append(note(f"Pareto configs indistinguishable within noise (their {c.level:.0%} intervals overlap on "
                          f"{objectives}): {listed}. Pick between them on other grounds.", "verdict"))
    elif len(confirmed_picks) > 1:
        parts.append(note(f"No two confirmed Pareto configs have {c.level:.0%} intervals that overlap on every "
                          f"objective ({objectives}): each differs from the others beyond the noise measured.",
                          "info"))
    parts.append(note(info.notes.get("confirm", "")))
    return "".join(parts)


def _confirmed_table(info: ReportInfo) -> str:
    """The confirmation runs of the baseline and the Pareto configs: mean ± interval and the speedup's interval."""
    c = info.confirmed
    if c is None:
        return ""
    order = [*([c.baseline] if c.baseline is not None else []),
             *[n for n in info.picks["number"] if n in c.summaries and n != c.baseline]]
    rows = []
    for n in order:
        s, runs = c.summaries[n], c.runs[n]
        ok = [r for r in runs if r.get("status") == "ok"]
        role = "baseline" if n == c.baseline else "knee" if n == info.knee else ""
        tags = f'<span class="pill{" knee" if role == "knee" else ""}">{e(role)}</span>' if role else ""
        failed = "; ".join(f"seed {r['seed']}: {r['status']} ({r.get('reason') or 'no reason recorded'})"
                           for r in c.failed(n)) or "none"
        speedup = c.speedups.get(n)
        shown = "reference" if n == c.baseline else text.ratio_interval(speedup) if speedup is not None else "–"
        rows.append([
            cell(f"#{n}", n, numeric=True), cell(tags, raw=True),
            cell(f"{len(ok)}/{len(runs)}", len(ok), numeric=True),
            cell(", ".join(str(r["seed"]) for r in runs)),
            *[cell(text.mean_interval(s[m], f), s[m].mean, numeric=True)
              for m, f in (("tokens_per_second", text.tokens), ("val_loss", text.loss),
                           ("peak_memory_bytes", text.mib))],
            cell(shown, speedup.value if speedup is not None else None, numeric=True), cell(failed, cls="why"),
        ])
    head = (f"<h3>Confirmed with other seeds</h3><p>Each config rerun with training seeds the original + 1000·k: "
            f"mean ± the half width of the {c.level:.0%} interval of the mean over the reruns that finished ok "
            "(the search's own run not counted). The speedup is the baseline's mean throughput into the config's, "
            "its interval from the delta method on the log of the ratio (Welch–Satterthwaite degrees of freedom): "
            "an interval that holds 1.00× is not measurably faster than the baseline.</p>")
    return head + table(["trial", "", "reruns ok", "seeds", *(label(m) for m in TABLE_METRICS[:3]),
                         "speedup vs baseline", "failed reruns"], rows, id="confirmed", sortable=True,
                        numeric={0, 2, 4, 5, 6, 7})


def _pruned(info: ReportInfo) -> str:
    """The trials the search stopped at a rung: where, their measured throughput and their loss there."""
    stopped = info.frame[info.frame["status"] == "pruned"]
    if stopped.empty:
        return ""
    budget = info.run.get("trial", {}).get("token_budget")
    rows = []
    for n, f in stopped.iterrows():
        tokens = f["tokens_trained"]
        share = f" ({tokens / budget:.0%} of the budget)" if budget and tokens == tokens else ""
        changed = " ".join(f'<span class="chg">{e(text.change(k, b, v))}</span>'
                           for k, b, v in differences(f["effective"], info.baseline)) or "same as baseline"
        rows.append([cell(f"#{n}", n, numeric=True),
                     cell(e(f"{text.tokens(tokens)}{share}"), tokens, numeric=True),
                     cell(text.tokens(f["tokens_per_second"]), f["tokens_per_second"], numeric=True),
                     cell(text.loss(f["rung_val_loss"]), f["rung_val_loss"], numeric=True),
                     cell(e(f["reason"]), cls="why"), cell(changed, raw=True, cls="changes")])
    head = (f"<p>{len(stopped)} trials were stopped early: at a rung (a share of the token budget) each one reports "
            "its measured throughput and memory and its loss on a quarter of the held-out tokens, and goes on only if "
            "it ranks in the top 1/eta, by Pareto front, of the trials that reached that rung (multi-objective "
            "asynchronous successive halving). Their rung loss compares only with other trials' at the same rung, "
            "so they are never on the front and never exported.</p>")
    return section("pruned", "Stopped early", head + table(
        ["trial", "stopped after", "tokens/s", "loss at the rung", "why", "changed from baseline"], rows,
        id="pruned-trials", sortable=True, numeric={0, 1, 2, 3}))


def _failed(info: ReportInfo) -> str:
    counts = info.status_counts
    pills = "".join(f'<span class="pill {"ok" if k == "ok" else "bad" if v else "zero"}">{e(k)} {v}</span>'
                    for k, v in counts.items())
    parts = [f"<p>{pills}</p>"]
    failures = info.failures
    if failures.empty:
        stopped = counts.get("pruned", 0)
        parts.append(note(("No trial failed" + (f"; {stopped} were stopped early (see Stopped early)." if stopped else
                                                f": all {len(info.frame)} finished ok.")) if len(info.frame) else
                          "The study holds no trials yet.", "info"))
        return section("failed", "What failed", "".join(parts))
    rows = []
    for n, f in failures.iterrows():
        changed = " ".join(f'<span class="chg">{e(text.change(k, b, v))}</span>'
                           for k, b, v in differences(f["effective"], info.baseline)) or "same as baseline"
        config = "\n".join(text.config_lines(f["config"], f["knobs"]))
        full = f'<details><summary>full config</summary><div class="cfg">{e(config)}</div></details>'
        tail = f"<details><summary>error tail</summary><pre>{e(f['error_tail'])}</pre></details>" \
            if f["error_tail"].strip() else ""
        rows.append([cell(f"#{n}", n, numeric=True), cell(f["status"]),
                     cell(e(f["reason"] or "(no reason recorded)") + tail, raw=True, cls="why"),
                     cell(changed + full, raw=True, cls="changes")])
    parts.append(table(["trial", "status", "why", "changed from baseline"], rows, id="failures", sortable=True,
                       numeric={0}))
    return section("failed", "What failed", "".join(parts))


def _kernels(info: ReportInfo) -> str:
    """Each Triton kernel timing once (shown only when some trial ran a kernel in Triton)."""
    k = info.kernels
    if k.empty:
        return ""
    on_cpu = k["device"].astype(str).str.contains("interpreter").any()
    parts = [
        "<p>Each kernel a trial ran in Triton, timed alone at that trial's shapes, forward and backward, beside "
        "the PyTorch op it replaces; trials with the same kernel, shape, dtype, tiles and device reuse one cached "
        "figure. Speed vs PyTorch above 1× means the kernel is faster. Click a header to sort.</p>",
        note("These timings come from Triton's CPU interpreter: they show the path works, not how fast the "
             "kernels are on a GPU.", "info") if on_cpu else "",
    ]
    rows = [[cell(r["kernel"]), cell(r["shape"]), cell(r["dtype"]), cell(r["tiles"], cls="changes"),
             cell(f"{r['triton_ms']:.3f}", r["triton_ms"], numeric=True),
             cell(f"{r['torch_ms']:.3f}", r["torch_ms"], numeric=True),
             cell(text.ratio(r["speedup"]), r["speedup"], numeric=True),
             cell(", ".join(f"#{n}" for n in r["trials"]), len(r["trials"])), cell(f"{r['device']}; {r['timer']}")]
            for _, r in k.iterrows()]
    parts.append(table(["kernel", "shape", "dtype", "tiles", "Triton ms", "PyTorch ms", "speed vs PyTorch",
                        "trials", "device; timer"], rows, id="kernels", sortable=True, numeric={4, 5, 6}))
    return section("kernels", "Triton kernels: each one against PyTorch", "".join(parts))


def _where(info: ReportInfo) -> str:
    fp = info.fingerprint
    hw, sw = fp.get("hardware", {}), fp.get("software", {})
    gpus = hw.get("gpus") or []
    gpu_names = sorted({g.get("name", "?") for g in gpus})
    gpu_text = ", ".join(f"{name} × {sum(g.get('name') == name for g in gpus)}" for name in gpu_names) or "none"
    if gpus and gpus[0].get("memory_bytes"):
        gpu_text += f" ({gpus[0]['memory_bytes'] / 2**30:.0f} GiB each)"
    memory = f"{hw['memory_bytes'] / 2**30:.1f} GiB" if hw.get("memory_bytes") else "–"
    hardware = [("CPU", f"{hw.get('cpu_model', '–')} × {hw.get('cpu_count', '–')} cores ({hw.get('machine', '')})"),
                ("memory", memory), ("GPU", gpu_text), ("GPU driver", sw.get("cuda_driver") or "–"),
                ("CUDA", sw.get("cuda") or "–"), ("hardware id", fp.get("hardware_id", "–"))]
    software = [(name, sw.get(key) or "–") for name, key in (
        ("torch", "torch"), ("Triton", "triton"), ("Optuna", "optuna"), ("cotune", "cotune"),
        ("Python", "python"), ("OS", "os"))]
    run = info.run
    workload = run.get("workload") or {}
    shape = _workload_line(workload)
    trial = run.get("trial") or {}
    settings = ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in trial.items()) or "–"
    search = [
        ("space file", run.get("space_path") or "–"), ("space", run.get("space_name") or "–"),
        ("workload", shape), ("trial settings", settings),
        ("objectives", ", ".join(f"{o.label} ({o.direction})" for o in info.objectives)),
        ("sampler", run.get("sampler") or "–"),
        ("budget", f"{run['counted']} trials counted ({run['trials']} in the study)"),
        ("wall time", text.seconds(run.get("wall_s"))), ("time in trials", text.seconds(run.get("trial_seconds"))),
        ("constraints", "; ".join(c.get("expr", "") for c in run.get("constraints", [])) or "none"),
    ]
    mixed = note(f"Trials here ran on {len(run['hardware_ids'])} different machines "
                 f"({', '.join(run['hardware_ids'])}); their timings are not comparable.", "missing") \
        if len(run.get("hardware_ids", [])) > 1 else ""
    missing = "" if fp else note("The study records no hardware fingerprint.")
    body = (f"{missing}{mixed}<div class=\"cols\"><div><h3>Hardware</h3>"
            f"{key_values([(k, e(v)) for k, v in hardware])}<h3>Software</h3>{key_values([(k, e(v)) for k, v in software])}"
            f"</div><div><h3>Search</h3>{key_values([(k, e(v)) for k, v in search])}</div></div>")
    return section("where", "Where it ran", body)


def _workload_line(w: dict) -> str:
    """The model, its shape, objective, tokenizer and data in one line."""
    if not w:
        return "–"
    heads = f"{w.get('n_head')} heads" + (f" ({w['n_kv_head']} key/value)" if w.get("n_kv_head") else "")
    objective = "masked LM" if w.get("objective") == "masked_lm" else "next token"
    return (f"{w.get('model', '?')}: {w.get('n_layer')} layers, {w.get('n_embd')} wide, {heads}, "
            f"T={w.get('seq_len')}, {objective}, vocab {w.get('vocab_size')} ({w.get('tokenizer', 'bytes')}), "
            f"data {w.get('data')}")


def _depth(info: ReportInfo, figs: dict) -> str:
    measured = (info.run.get("trial") or {}).get("measured_steps")
    steps = f"its {measured} measured steps" if measured else "its measured steps"
    parts = [
        "<h3>Training loss of the Pareto configs</h3>",
        "<p>Click a legend entry to hide a curve, double-click to show only that one. The knee is drawn thick.</p>"
        if figs["loss"] is not None else "",
        figure(figs["loss"], "fig-loss", "No loss curves recorded for the Pareto configs."),
        "<h3>Step time: mean ± standard deviation</h3>",
        f"<p>Each trial's optimizer-step time over {e(steps)} (warm-up excluded), with one standard deviation "
        "either side: the noise within one trial. " + (
            "Configs were not repeated, so the spread between runs of the same config is not measured here"
            if info.confirmed is None else "The spread between runs of the same config with other seeds is in "
            "What to pick (confirmation runs)") + ".</p>" if figs["steps"] is not None else "",
        figure(figs["steps"], "fig-steps", "No step times recorded."),
        "<h3>Where each Pareto trial's time went</h3>",
        figure(figs["phases"], "fig-phases", "No phase timings recorded for the Pareto configs."),
        "<h3>Each Pareto config</h3>",
    ]
    if info.picks.empty:
        parts.append(note(info.notes.get("pareto", "No Pareto configs.")))
    for n in info.picks["number"]:
        parts.append(_trial_card(info, int(n)))
    return section("depth", "Trials in depth", "".join(parts))


def _trial_card(info: ReportInfo, n: int) -> str:
    row = info.frame.loc[n]
    tags = info.picks.at[n, "tags"]
    head = (f"trial {n}{' · ' + ', '.join(tags) if tags else ''} · {text.tokens(row['tokens_per_second'])} tok/s · "
            f"val loss {text.loss(row['val_loss'])} · {text.mib(row['peak_memory_bytes'])}")
    metrics = [("MFU", text.percent(row["mfu"])),
               ("step time", f"{row['step_time_mean_s'] * 1e3:.1f} ± {row['step_time_std_s'] * 1e3:.1f} ms"
                if not text.missing(row["step_time_mean_s"]) else "–"),
               ("tokens trained", text.tokens(row["tokens_trained"])),
               ("trial wall time", text.seconds(row["duration_s"]))]
    ops = row["profile_top_ops"]
    if ops:
        op_rows = [[cell(o.get("name", "?")), cell(f"{float(o.get('self_time_ms', 0)):.2f}", numeric=True),
                    cell(str(o.get("calls", "")), numeric=True), cell(f"{float(o.get('percent', 0)):.1f}%", numeric=True)]
                   for o in ops]
        profile = "<h3>Top profiler ops (self time)</h3>" + table(["op", "self ms", "calls", "share"], op_rows,
                                                                   numeric={1, 2, 3})
    else:
        profile = note("No profiler pass recorded for this trial (a search run with --profile records its top ops).",
                       "info")
    config = json.dumps(row["config"] or row["knobs"], indent=2)
    open_ = " open" if n == info.knee or (info.knee is None and n == info.picks.index[0]) else ""
    return (f"<details{open_}><summary>{e(head)}</summary><div class=\"cols\"><div>"
            f"{key_values([(k, e(v)) for k, v in metrics])}{profile}</div>"
            f"<div><h3>Config (the TrialConfig the trial ran)</h3><pre>{e(config)}</pre></div></div></details>")
