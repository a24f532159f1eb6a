"""``cotune report --summary``: the report's key table and verdicts in the terminal (rich)."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cotune.labels import TABLE_METRICS, label
from cotune.report import text
from cotune.report.info import ReportInfo


def summary_table(info: ReportInfo) -> Table:
    """The Pareto configs, fastest first: metrics, tags, speedup (when the baseline was measured), changes."""
    measured = info.baseline_trial is not None
    names = ", ".join(o.label for o in info.objectives)
    table = Table(title=f"Pareto set of {info.study_name}: {len(info.picks)} configs ({names})", header_style="bold")
    for header in ("#", "", *(label(m) for m in TABLE_METRICS)):
        table.add_column(header, justify="left" if header == "" else "right")
    if measured:
        table.add_column(f"speedup vs #{info.baseline_trial}", justify="right")
        table.add_column("Δ loss", justify="right")
    table.add_column("changed from baseline", overflow="fold")
    for n, p in info.picks.iterrows():
        versus = [text.ratio(p["speedup"]), text.signed(p["loss_delta"])] if measured else []
        changed = ", ".join(text.change(k, b, v) for k, b, v in p["differs"]) or "same as baseline"
        table.add_row(str(n), ", ".join(p["tags"]), text.tokens(p["tokens_per_second"]), text.loss(p["val_loss"]),
                      text.mib(p["peak_memory_bytes"]), text.percent(p["mfu"]), *versus, escape(changed),
                      style="bold" if n == info.knee else None)
    return table


def summary(info: ReportInfo) -> Group:
    """Table plus one line each on failures, convergence and the baseline."""
    counts = info.status_counts
    statuses = ", ".join(f"{k} {v}" for k, v in counts.items() if v or k == "ok")
    lines: list[Table | Text] = []
    if info.picks.empty:
        lines.append(Text(info.notes.get("pareto", "no Pareto configs")))
    else:
        lines.append(summary_table(info))
    lines.append(Text(f"trials: {len(info.frame)} ({statuses})"))
    if info.convergence is not None:
        lines.append(Text(f"convergence: {info.convergence.verdict}"))
    if "baseline" in info.notes:
        lines.append(Text(f"baseline: {info.notes['baseline']}"))
    lines.extend(Text(line) for line in confirmed_lines(info))
    return Group(*lines)


def confirmed_lines(info: ReportInfo) -> list[str]:
    """The confirmation runs in a few lines: speedups with their intervals, the baseline's loss spread, ties."""
    c = info.confirmed
    if c is None:
        return [] if info.ok.empty else ["noise: each config ran once; `cotune confirm` reruns the front and the "
                                         "baseline with other seeds"]
    out = []
    if c.speedups:
        out.append(f"confirmed speedup over baseline #{c.baseline} ({c.level:.0%} interval): " + ", ".join(
            f"#{n} {text.ratio_interval(r)}" for n, r in c.speedups.items()))
    if c.baseline is not None and c.summaries[c.baseline]["val_loss"].n >= 2:
        loss = c.summaries[c.baseline]["val_loss"]
        out.append(f"baseline val loss from seed to seed: std {loss.std:.4f} over {loss.n} seeds")
    if c.same_within_noise:
        out.append("indistinguishable within noise: " + "; ".join(f"#{a} and #{b}" for a, b in c.same_within_noise))
    return out


def print_summary(info: ReportInfo, console: Console) -> None:
    console.print(summary(info))
