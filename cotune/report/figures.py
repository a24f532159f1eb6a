"""Plotly figures drawn from a ReportInfo; no computing here beyond laying values out.

Every figure returns ``None`` when its data is missing; the page then shows the
note ``info.notes`` holds instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cotune.display import fmt
from cotune.labels import BEST_LABELS, label
from cotune.report import text
from cotune.report.info import ReportInfo

FONT = "system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"
ACCENT = "#2563eb"
KNEE = "#d97706"
FADED = "rgba(100, 116, 139, 0.30)"
PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#d97706", "#0891b2", "#db2777", "#65a30d",
           "#7c3aed", "#ea580c", "#0d9488", "#4f46e5"]


def _layout(fig: go.Figure, height: int, **kw: Any) -> go.Figure:
    # Per-figure margin and legend settings refine the defaults rather than replace them.
    margin = {**dict(l=70, r=30, t=50, b=60), **kw.pop("margin", {})}
    legend = {**dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0), **kw.pop("legend", {})}
    fig.update_layout(
        template="plotly_white", height=height, font=dict(family=FONT, size=13, color="#1f2937"),
        margin=margin, legend=legend, hoverlabel=dict(font=dict(family=FONT, size=12), align="left"), **kw,
    )
    return fig


def hover(info: ReportInfo, number: int) -> str:
    """A trial's metrics and full config, for a point's hover box."""
    row = info.frame.loc[number]
    head = (f"<b>trial {number}</b> · {text.tokens(row['tokens_per_second'])} tok/s · "
            f"loss {text.loss(row['val_loss'])} · {text.mib(row['peak_memory_bytes'])} · "
            f"MFU {text.percent(row['mfu'])}")
    return "<br>".join([head, *text.config_lines(row["config"], row["knobs"])])


def pareto(info: ReportInfo) -> go.Figure | None:
    """Throughput against validation loss; the front in colour (memory as colour), the rest faded."""
    ok = info.ok.dropna(subset=["tokens_per_second", "val_loss"])
    if ok.empty:
        return None
    front = ok.loc[[n for n in info.pareto_numbers if n in ok.index]]
    rest = ok.drop(front.index)
    fig = go.Figure()
    fig.add_scatter(
        x=rest["tokens_per_second"].tolist(), y=rest["val_loss"].tolist(), mode="markers", name=f"dominated ({len(rest)})",
        marker=dict(size=8, color=FADED, line=dict(width=0)),
        hovertext=[hover(info, n) for n in rest.index], hoverinfo="text",
    )
    # The dotted front line is only the front in this view when these are the two objectives.
    if {o.name for o in info.objectives} == {"tokens_per_second", "val_loss"} and len(front) > 1:
        line = front.sort_values("tokens_per_second")
        fig.add_scatter(x=line["tokens_per_second"].tolist(), y=line["val_loss"].tolist(), mode="lines", hoverinfo="skip",
                        line=dict(color=ACCENT, width=1.5, dash="dot", shape="linear"), showlegend=False)
    memory = front["peak_memory_bytes"] / 2**20
    marker: dict[str, Any] = dict(size=13, color=ACCENT, line=dict(width=1.5, color="white"))
    if memory.notna().all() and len(front) > 1:
        marker.update(color=memory.tolist(), colorscale="Viridis", showscale=True,
                      colorbar=dict(title=dict(text="peak MiB", side="right"), thickness=14, len=0.8))
    fig.add_scatter(
        # Plain lists, not typed arrays: the page's figure data then reads back as numbers (fig.data[i].x).
        x=front["tokens_per_second"].tolist(), y=front["val_loss"].tolist(), mode="markers",
        name=f"Pareto front ({len(front)})",
        meta="pareto", marker=marker, hovertext=[hover(info, n) for n in front.index], hoverinfo="text",
    )
    if info.baseline_trial is not None:
        b = info.frame.loc[info.baseline_trial]
        fig.add_scatter(x=[b["tokens_per_second"]], y=[b["val_loss"]], mode="markers", name="baseline",
                        marker=dict(symbol="diamond", size=13, color="#111827", line=dict(width=1.5, color="white")),
                        hovertext=[hover(info, info.baseline_trial)], hoverinfo="text")
    _confirmed_points(fig, info)
    labels: dict[int, list[str]] = {}
    if info.knee is not None:
        labels.setdefault(info.knee, []).append("knee")
    for name, number in info.extremes.items():
        labels.setdefault(number, []).append(BEST_LABELS[name] if len(info.objectives) > 1 else "best")
    for k, (number, words) in enumerate(labels.items()):
        row = info.frame.loc[number]
        is_knee = number == info.knee
        fig.add_annotation(
            x=row["tokens_per_second"], y=row["val_loss"], text=f"<b>{' · '.join(words)}</b> #{number}",
            showarrow=True, arrowhead=2, arrowcolor=KNEE if is_knee else "#475569", ax=0 if is_knee else 40 * (-1) ** k,
            ay=50 if is_knee else -40, font=dict(color=KNEE if is_knee else "#334155", size=12),
            bgcolor="rgba(255,255,255,0.85)",
        )
    if info.knee is not None:
        row = info.frame.loc[info.knee]
        fig.add_scatter(x=[row["tokens_per_second"]], y=[row["val_loss"]], mode="markers", name="knee",
                        marker=dict(size=24, color="rgba(0,0,0,0)", line=dict(width=2.5, color=KNEE)),
                        hoverinfo="skip")
    return _layout(fig, 520, xaxis_title="throughput (tokens/s, higher is better)",
                   yaxis_title="validation loss (nats/token, lower is better)")


def _confirmed_points(fig: go.Figure, info: ReportInfo) -> None:
    """Each confirmed trial's mean over its reruns, with its 95% interval as error bars on both axes."""
    c = info.confirmed
    if c is None:
        return
    groups = (("baseline", [n for n in c.summaries if n == c.baseline], "#111827"),
              ("Pareto", [n for n in c.summaries if n != c.baseline], ACCENT))
    for what, numbers, colour in groups:
        numbers = [n for n in numbers if c.summaries[n]["tokens_per_second"].n and c.summaries[n]["val_loss"].n]
        if not numbers:
            continue
        s = [c.summaries[n] for n in numbers]
        # A rerun count below two has no interval: no bar (None) rather than a bar of zero.
        half = {m: [None if math.isnan(x[m].half_width) else x[m].half_width for x in s]
                for m in ("tokens_per_second", "val_loss")}
        # A faint line from each config's search run to its confirmed mean says which circle is whose.
        xs: list[float | None] = []
        ys: list[float | None] = []
        for n, x in zip(numbers, s):
            xs += [float(info.frame.at[n, "tokens_per_second"]), x["tokens_per_second"].mean, None]
            ys += [float(info.frame.at[n, "val_loss"]), x["val_loss"].mean, None]
        fig.add_scatter(x=xs, y=ys, mode="lines", line=dict(color=colour, width=1, dash="dot"), opacity=0.5,
                        hoverinfo="skip", showlegend=False)
        fig.add_scatter(
            x=[x["tokens_per_second"].mean for x in s], y=[x["val_loss"].mean for x in s], mode="markers",
            name=f"{what} confirmed: mean ± {c.level:.0%} interval", meta="confirmed",
            marker=dict(symbol="circle-open", size=11, color=colour, line=dict(width=2)),
            error_x=dict(type="data", array=half["tokens_per_second"], color=colour, thickness=1.5, width=4),
            error_y=dict(type="data", array=half["val_loss"], color=colour, thickness=1.5, width=4),
            hovertext=[_confirmed_hover(info, n) for n in numbers], hoverinfo="text",
        )


def _confirmed_hover(info: ReportInfo, number: int) -> str:
    c = info.confirmed
    s = c.summaries[number]
    seeds = ", ".join(str(r["seed"]) for r in c.runs[number] if r.get("status") == "ok")
    row = info.frame.loc[number]
    return "<br>".join([
        f"<b>trial {number} confirmed</b>: {s['val_loss'].n} reruns (seeds {seeds})",
        f"{text.mean_interval(s['tokens_per_second'], text.tokens)} tok/s · loss "
        f"{text.mean_interval(s['val_loss'], text.loss)}",
        f"its search run: {text.tokens(row['tokens_per_second'])} tok/s · loss {text.loss(row['val_loss'])}",
    ])


def convergence(info: ReportInfo) -> go.Figure | None:
    """Hypervolume (or the single objective's best) after each trial."""
    c = info.convergence
    if c is None:
        return None
    fig = go.Figure()
    fig.add_scatter(x=c.numbers, y=c.values, mode="lines", line=dict(shape="hv", color=ACCENT, width=2),
                    name="after each trial", hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>")
    improved = [v for n, v in zip(c.numbers, c.values) if n in set(c.improved_at)]
    fig.add_scatter(x=c.improved_at, y=improved, mode="markers", name="front improved",
                    marker=dict(size=7, color=ACCENT), hovertemplate="trial %{x} improved it: %{y:.4g}<extra></extra>")
    if c.kind == "hypervolume":
        title = "hypervolume (share of box)"
    else:
        o = info.objectives[0]
        title = f"best {o.label} so far"
    return _layout(fig, 360, xaxis_title="trial number", yaxis_title=title)


def importance(info: ReportInfo) -> go.Figure | None:
    """Importance of each knob for each objective, most important on top."""
    table = info.importances
    if table is None:
        return None
    fig = go.Figure()
    knobs = [text.knob(n) for n in table.index][::-1]
    for k, o in enumerate(info.objectives):
        fig.add_bar(y=knobs, x=table[o.name].to_numpy()[::-1], orientation="h", name=o.label,
                    marker_color=PALETTE[k], hovertemplate="%{y}: %{x:.1%}<extra>" + o.label + "</extra>")
    return _layout(fig, 120 + 24 * len(knobs) * len(info.objectives), barmode="group",
                   xaxis=dict(title="share of importance (PED-ANOVA)", tickformat=".0%"), margin=dict(l=140))


def _dimension(name: str, values: pd.Series, log: bool) -> dict[str, Any]:
    """A parallel-coordinates axis; categories and booleans become evenly spaced ticks."""
    if values.map(lambda v: isinstance(v, (bool, str))).any():
        categories = sorted(set(values), key=str)
        code = {c: i for i, c in enumerate(categories)}
        return dict(label=text.knob(name), values=[code[v] for v in values],
                    tickvals=list(range(len(categories))), ticktext=[fmt(c) for c in categories])
    numbers = values.astype(float)
    if log and (numbers > 0).all():
        ticks = np.arange(math.floor(np.log10(numbers.min())), math.ceil(np.log10(numbers.max())) + 1)
        return dict(label=f"{text.knob(name)} (log)", values=np.log10(numbers), tickvals=ticks,
                    ticktext=[f"1e{int(t)}" for t in ticks])
    return dict(label=text.knob(name), values=numbers)


def parallel(info: ReportInfo) -> go.Figure | None:
    """Every ok trial as a line through its knob values and its objectives."""
    ok = info.ok
    if len(ok) < 2 or not info.tunable:
        return None
    knobs = pd.DataFrame(list(ok["effective"]), index=ok.index)
    dims = [_dimension(n, knobs[n], n in info.run.get("log_knobs", [])) for n in info.tunable]
    columns = [("tokens_per_second", label("tokens_per_second")), ("val_loss", label("val_loss"))]
    if ok["peak_memory_bytes"].notna().all():
        columns.append(("peak_memory_bytes", "peak MiB"))
    for column, title in columns:
        values = ok[column] / (2**20 if column == "peak_memory_bytes" else 1)
        if values.notna().all():
            dims.append(dict(label=title, values=values))
    colour = ok["val_loss"] if ok["val_loss"].notna().all() else ok["tokens_per_second"]
    fig = go.Figure(go.Parcoords(
        dimensions=dims, labelangle=-20, labelside="top",
        line=dict(color=colour, colorscale="Viridis_r", showscale=True,
                  colorbar=dict(title=dict(text=label("val_loss"), side="right"), thickness=14)),
    ))
    return _layout(fig, 440, margin=dict(l=60, r=60, t=90, b=30))


def loss_curves(info: ReportInfo) -> go.Figure | None:
    """Training loss against tokens for each Pareto config (and the baseline), validation loss at the end."""
    numbers = list(info.picks["number"])
    if info.baseline_trial is not None and info.baseline_trial not in numbers:
        numbers.append(info.baseline_trial)
    curves = [(n, info.frame.at[n, "loss_curve"]) for n in numbers]
    curves = [(n, c) for n, c in curves if len(c) >= 2]
    if not curves:
        return None
    fig = go.Figure()
    for k, (n, curve) in enumerate(curves):
        tags = ", ".join(info.picks.at[n, "tags"]) if n in info.picks.index else "baseline"
        name = f"#{n}" + (f" ({tags})" if tags else "")
        colour = KNEE if n == info.knee else PALETTE[k % len(PALETTE)]
        fig.add_scatter(x=[p[1] for p in curve], y=[p[2] for p in curve], mode="lines", name=name,
                        line=dict(width=3 if n == info.knee else 1.6, color=colour),
                        hovertemplate=f"trial {n}<br>%{{x:,}} tokens: loss %{{y:.3f}}<extra></extra>")
    # A one-step spike (lr too high for a moment) would flatten every curve: clip the axis to the start loss.
    values = [p[2] for _, c in curves for p in c if math.isfinite(p[2])]
    starts = [c[0][2] for _, c in curves if math.isfinite(c[0][2])]
    yaxis: dict[str, Any] = dict(title="training loss (nats/token)")
    if values and starts:
        top = max(starts)
        yaxis["range"] = [min(values) - 0.1, top + 0.2]
    return _layout(fig, 420, xaxis_title="training tokens", yaxis=yaxis,
                   legend=dict(orientation="v", x=1.02, y=1, yanchor="top"), margin=dict(r=190))


def step_times(info: ReportInfo) -> go.Figure | None:
    """Mean step time ± one standard deviation over the measured steps of every ok trial."""
    ok = info.ok.dropna(subset=["step_time_mean_s"])
    if ok.empty:
        return None
    fig = go.Figure()
    on_front = ok.index.isin(info.pareto_numbers)
    for mask, name, colour in ((~on_front, "other ok trials", "#94a3b8"), (on_front, "Pareto configs", ACCENT)):
        part = ok[mask]
        if part.empty:
            continue
        fig.add_scatter(
            x=part.index, y=part["step_time_mean_s"] * 1e3, mode="markers", name=name,
            marker=dict(size=8, color=colour),
            error_y=dict(type="data", array=(part["step_time_std_s"] * 1e3).fillna(0), color=colour, thickness=1.2),
            customdata=[k.get("global_batch_size") for k in part["effective"]],
            hovertemplate="trial %{x}: %{y:.1f} ms ± %{error_y.array:.1f} ms per step "
                          "(global batch %{customdata})<extra></extra>",
        )
    return _layout(fig, 360, xaxis_title="trial number", yaxis_title="optimizer step time (ms, mean ± std)")


def phases(info: ReportInfo) -> go.Figure | None:
    """Where each Pareto trial's wall time went, phase by phase."""
    numbers = [n for n in info.picks["number"] if info.frame.at[n, "phase_seconds"]]
    if not numbers:
        return None
    table = pd.DataFrame([info.frame.at[n, "phase_seconds"] for n in numbers], index=numbers)
    table = table.drop(columns=[c for c in ("process_wall",) if c in table.columns]).fillna(0.0)
    labels = [f"#{n}" for n in numbers]
    fig = go.Figure()
    for k, column in enumerate(table.columns):
        fig.add_bar(y=labels, x=table[column], orientation="h", name=column.replace("_", " "),
                    marker_color=PALETTE[k % len(PALETTE)], hovertemplate="%{y} " + column + ": %{x:.2f} s<extra></extra>")
    return _layout(fig, 140 + 28 * len(numbers), barmode="stack", xaxis_title="seconds in the trial process",
                   yaxis=dict(autorange="reversed"), legend=dict(traceorder="normal"))
