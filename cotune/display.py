"""Rich tables and one-line summaries for the terminal. Data comes from ``cotune.study``."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from cotune.config import TrialConfig, TrialResult
from cotune.labels import TABLE_METRICS, label
from cotune.study import Row, differing_knobs, objective_value


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if value != 0 and (abs(value) < 0.01):
            return f"{value:.2e}"
        return f"{value:.4g}"
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return value
    return str(value)


def fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{float(n) / 2**20:,.0f}M"


def metric_cells(row: Row) -> list[str]:
    m = row.metrics
    tps = objective_value(row, "tokens_per_second")
    loss = objective_value(row, "val_loss")
    mfu = m.get("mfu")
    return [
        "-" if tps is None else f"{tps:,.0f}",
        "-" if loss is None else f"{loss:.4f}",
        fmt_bytes(m.get("peak_memory_bytes")),
        "-" if mfu is None else f"{float(mfu) * 100:.2f}%",
    ]


def knob_cell(row: Row, name: str) -> str:
    """A knob's value in a table; "-" where the trial has none (it was never built)."""
    return fmt(row.knobs[name]) if name in row.knobs else "-"


def trials_table(table_rows: list[Row], title: str) -> Table:
    """All trials: status, metrics, the knobs that vary across the study, and why a trial failed."""
    varying = differing_knobs(table_rows)
    table = Table(title=title, header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("status", justify="left")
    for name in (*TABLE_METRICS, *varying):
        table.add_column(label(name), justify="right")
    for r in table_rows:
        style = None if r.status == "ok" else "dim"
        table.add_row(str(r.number), r.status, *metric_cells(r), *(knob_cell(r, n) for n in varying), style=style)
    return table


def failure_lines(table_rows: list[Row]) -> list[str]:
    """One line per trial that did not finish ok: its number, status and why."""
    return [f"#{r.number} {r.status}: {r.reason}" for r in table_rows if r.status != "ok"]


def pareto_table(table_rows: list[Row], title: str) -> tuple[Table, dict[str, Any]]:
    """The Pareto configs, with the knobs that differ between them highlighted.

    Returns the table and the knob values shared by every row (shown once, below it).
    """
    varying = differing_knobs(table_rows)
    shared = {k: v for k, v in (table_rows[0].knobs.items() if table_rows else []) if k not in varying}
    table = Table(title=title, header_style="bold")
    for header in ("#", *(label(m) for m in TABLE_METRICS)):
        table.add_column(header, justify="right")
    for name in varying:
        table.add_column(label(name), justify="right", style="bold cyan", header_style="bold cyan")
    for r in table_rows:
        table.add_row(str(r.number), *metric_cells(r)[:4], *(knob_cell(r, n) for n in varying))
    return table, shared


def shared_line(shared: dict[str, Any]) -> str:
    return "same in every row: " + ", ".join(f"{label(k)}={fmt(v)}" for k, v in shared.items())


def config_line(config: TrialConfig | None) -> str:
    if config is None:
        return "infeasible config"
    k = config.flat()
    return (
        f"micro {k['micro_batch_size']} x accum {config.batch.grad_accum_steps} = global {k['global_batch_size']}, "
        f"{k['precision']}, lr {k['learning_rate']:.2e}, warmup {k['warmup_fraction']:.2f}, "
        f"wd {k['weight_decay']:.3f}, beta2 {k['adam_beta2']:.3f}, "
        f"ckpt {fmt(k['activation_checkpointing'])}, compile {fmt(k['compile'])}"
    )


def result_line(number: int, result: TrialResult) -> str:
    m = result.metrics
    if result.status == "ok":
        return (
            f"trial {number:>3} [green]ok[/]        {float(m['tokens_per_second']):>10,.0f} tok/s  "
            f"val loss {float(m['val_loss']):.4f}  peak {fmt_bytes(m.get('peak_memory_bytes'))}"
        )
    if result.status == "pruned":  # stopped at a rung: its throughput is measured, its loss is the rung's
        return (
            f"trial {number:>3} [cyan]pruned[/]    {float(m['tokens_per_second']):>10,.0f} tok/s  "
            f"rung loss {float(m['rung_val_loss']):.4f}  {escape(result.reason.split(':')[0])}"
        )
    colour = "yellow" if result.status == "infeasible" else "red"
    reason = result.reason or (result.error_tail.strip().splitlines() or [""])[-1]
    # A reason is the trial's own text (gloo's begins "[/__w/pytorch/..."): shown as it is, never as markup.
    return f"trial {number:>3} [{colour}]{result.status:<10}[/] {escape(reason[:160])}"


def metrics_table(result: TrialResult) -> Table:
    table = Table(title=f"trial: {result.status}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, fmt_bytes(value) if key == "peak_memory_bytes" else fmt(value))
    for key, value in result.phase_seconds.items():
        table.add_row(f"time: {key}", f"{value:.2f} s")
    return table
