"""How the report writes numbers and configs, shared by the HTML page and the terminal summary."""

from __future__ import annotations

import math
from typing import Any

from cotune.display import fmt
from cotune.labels import label
from cotune.report.frame import config_sections


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def tokens(value: Any) -> str:
    return "–" if missing(value) else f"{float(value):,.0f}"


def loss(value: Any) -> str:
    return "–" if missing(value) else f"{float(value):.4f}"


def mib(value: Any) -> str:
    return "–" if missing(value) else f"{float(value) / 2**20:,.0f} MiB"


def percent(value: Any) -> str:
    return "–" if missing(value) else f"{float(value) * 100:.1f}%"


def ratio(value: Any) -> str:
    return "–" if missing(value) else f"{float(value):.2f}×"


def signed(value: Any) -> str:
    return "–" if missing(value) else f"{float(value):+.4f}"


def mean_interval(summary: Any, shown: Any) -> str:
    """A mean ± the half width of its interval (a ``cotune.confirm.Summary``), e.g. ``12,345 ± 678``, written
    by ``shown`` (``tokens``, ``loss``, ``mib``); the mean alone when there is no interval."""
    if not summary.n:
        return "–"
    if missing(summary.half_width):
        return shown(summary.mean)
    return f"{shown(summary.mean)} ± {shown(summary.half_width)}"


def ratio_interval(r: Any) -> str:
    """A ratio with its interval (a ``cotune.confirm.Ratio``), e.g. ``1.42× (1.30–1.55)``."""
    if missing(r.value):
        return "–"
    return ratio(r.value) + ("" if missing(r.low) else f" ({float(r.low):.2f}–{float(r.high):.2f})")


def seconds(value: Any) -> str:
    if missing(value):
        return "–"
    value = float(value)
    if math.isinf(value):
        return "never"
    return f"{value:.1f} s" if value < 120 else f"{int(value // 60)} min {value % 60:02.0f} s"


def knob(name: str) -> str:
    return label(name)


def change(name: str, before: Any, after: Any) -> str:
    """One knob changed from the baseline, e.g. ``lr 1.00e-03→2.92e-03``."""
    return f"{knob(name)} {fmt(before)}→{fmt(after)}"


def config_lines(config: dict[str, Any] | None, knobs: dict[str, Any]) -> list[str]:
    """A TrialConfig as one short line per section; the sampled knobs when no config was built."""
    sections = config_sections(config)
    if not sections:
        return [", ".join(f"{knob(k)}={fmt(v)}" for k, v in knobs.items())] if knobs else []
    return [f"{section}: " + ", ".join(f"{k}={fmt(v)}" for k, v in values.items())
            for section, values in sections.items()]


def reused(measured: Any) -> list[str]:
    """Where a trial's values came from, when not all from its own run: ["loss of #4", "throughput of #2"]."""
    if not isinstance(measured, dict):
        return []
    words = []
    for what in ("throughput", "loss"):
        source = measured.get(what, "here")
        if source == "layout":
            words.append(f"loss trained on #{measured.get('loss_layout_from')}'s layout")
        elif source != "here":
            words.append(f"{what} of #{source}")
    return words
