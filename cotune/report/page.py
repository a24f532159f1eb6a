"""The page around the sections: HTML helpers, the inline CSS and the table-sorting script."""

from __future__ import annotations

from html import escape
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

PLOT_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["select2d", "lasso2d"]}


def e(value: Any) -> str:
    return escape(str(value), quote=True)


def figure(fig: go.Figure | None, div_id: str, missing: str) -> str:
    """A plotly figure as a div (plotly.js itself is on the page once, in the head), or the note why not."""
    if fig is None:
        return note(missing)
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOT_CONFIG)


def note(message: str, kind: str = "missing") -> str:
    return f'<p class="note {kind}">{e(message)}</p>' if message else ""


def table(headers: list[str], rows: list[list[str]], *, id: str = "", sortable: bool = False,
          numeric: set[int] | frozenset[int] = frozenset(), row_classes: list[str] | None = None) -> str:
    """An HTML table; cells are HTML already (escape them first). ``numeric`` columns align right."""
    attrs = (f' id="{e(id)}"' if id else "") + (' class="sortable"' if sortable else "")
    hint = ' title="click to sort"' if sortable else ""
    head = "".join(f'<th{" class=num" if i in numeric else ""}{hint}>{h}</th>' for i, h in enumerate(headers))
    body = []
    for k, r in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        body.append(f"<tr{cls}>" + "".join(r) + "</tr>")
    return f'<div class="scroll"><table{attrs}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def cell(shown: str, sort_value: float | str | None = None, numeric: bool = False, raw: bool = False,
         cls: str = "") -> str:
    """A table cell; ``sort_value`` (a number) is what the sortable table orders by."""
    classes = " ".join(c for c in ("num" if numeric else "", cls) if c)
    attrs = f' class="{classes}"' if classes else ""
    if sort_value is not None:
        attrs += f' data-v="{e(sort_value)}"'
    return f"<td{attrs}>{shown if raw else e(shown)}</td>"


def key_values(pairs: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{e(title)}</h2>{body}</section>'


CSS = """
:root { --ink:#1f2937; --muted:#64748b; --line:#e5e7eb; --accent:#2563eb; --knee:#d97706; --bg:#f4f6f9; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif; }
header { background:#0f172a; color:#f8fafc; padding:22px 0 18px; }
header .wrap, main, nav .wrap { max-width:1240px; margin:0 auto; padding:0 24px; }
header h1 { margin:0; font-size:24px; font-weight:650; letter-spacing:.2px; }
header p { margin:4px 0 0; color:#cbd5e1; }
nav { background:#fff; border-bottom:1px solid var(--line); position:sticky; top:0; z-index:10; }
nav a { display:inline-block; padding:10px 12px; color:var(--muted); text-decoration:none; font-size:14px; }
nav a:hover { color:var(--accent); }
main { padding-bottom:40px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px 20px; margin:18px 0;
  box-shadow:0 1px 2px rgba(15,23,42,.04); }
h2 { margin:0 0 8px; font-size:19px; }
h3 { margin:18px 0 6px; font-size:15px; }
p { margin:6px 0; max-width:980px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(140px,1fr)); gap:12px; margin:18px 0 0; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.6px; }
.card .v { font-size:22px; font-weight:650; font-variant-numeric:tabular-nums; }
.card .s { color:var(--muted); font-size:13px; }
.card.knee { border-color:var(--knee); }
.note { color:#475569; background:#f8fafc; border-left:3px solid #94a3b8; padding:8px 12px; border-radius:4px; }
.note.missing { border-left-color:var(--knee); background:#fffbeb; color:#78350f; }
.note.verdict { border-left-color:var(--accent); background:#eff6ff; color:#1e3a8a; font-weight:550; }
.scroll { overflow-x:auto; margin:10px 0; }
table { border-collapse:collapse; font-size:13.5px; font-variant-numeric:tabular-nums; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
thead th { background:#f1f5f9; position:sticky; top:0; white-space:nowrap; }
.num { text-align:right; white-space:nowrap; }
table.sortable thead th { cursor:pointer; user-select:none; }
table.sortable thead th:hover { background:#e2e8f0; }
th[data-dir=asc]::after { content:" ▲"; font-size:10px; } th[data-dir=desc]::after { content:" ▼"; font-size:10px; }
tr.knee td { background:#fff7ed; } tbody tr:hover td { background:#f8fafc; }
table.kv th { background:none; color:var(--muted); font-weight:500; white-space:nowrap; width:210px; }
table.kv { width:100%; }
.pill { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; background:#e0e7ff; color:#3730a3;
  margin:0 3px 2px 0; white-space:nowrap; }
.pill.knee { background:#ffedd5; color:#9a3412; } .pill.bad { background:#fee2e2; color:#991b1b; }
.pill.zero { background:#f1f5f9; color:#94a3b8; } .pill.ok { background:#dcfce7; color:#166534; }
.chg { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12px; white-space:nowrap;
  display:inline-block; background:#f1f5f9; border-radius:4px; padding:0 5px; margin:1px 2px; }
#picks, #failures { width:100%; } td.why { min-width:260px; max-width:520px; }
.cfg { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12px; white-space:pre-wrap;
  word-break:break-word; margin:4px 0; }
pre { background:#0f172a; color:#e2e8f0; padding:10px 12px; border-radius:6px; overflow:auto; font-size:12px;
  max-height:360px; }
details { border:1px solid var(--line); border-radius:8px; padding:6px 12px; margin:8px 0; }
details summary { cursor:pointer; font-weight:550; }
td details { border:none; padding:0; margin:2px 0; } td details summary { font-weight:400; color:var(--accent); }
.cols { display:grid; grid-template-columns:repeat(auto-fit,minmax(360px,1fr)); gap:18px; }
footer { color:var(--muted); font-size:13px; text-align:center; padding:10px 0 30px; }
"""

# Clicking a header sorts by it (numbers by their data-v value, missing ones last); again reverses.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("thead th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      var key = function (row) {
        var c = row.cells[col];
        if (c.dataset.v !== undefined) { var x = parseFloat(c.dataset.v); return isNaN(x) ? null : x; }
        return c.textContent.trim().toLowerCase();
      };
      var body = table.tBodies[0];
      Array.prototype.slice.call(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
        return dir === "asc" ? c : -c;
      }).forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def document(title: str, subtitle: str, nav: list[tuple[str, str]], cards: str, body: str, footer: str,
             plotly_js: str) -> str:
    """The whole page: plotly.js inline once (when any figure needs it), CSS and script inline."""
    links = "".join(f'<a href="#{a}">{e(t)}</a>' for a, t in nav)
    script = f'<script type="text/javascript">{plotly_js}</script>' if plotly_js else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{e(title)}</title><style>{CSS}</style>{script}</head><body>"
        f"<header><div class=\"wrap\"><h1>{e(title)}</h1><p>{subtitle}</p></div></header>"
        f"<nav><div class=\"wrap\">{links}</div></nav>"
        f"<main>{cards}{body}</main><footer>{footer}</footer>"
        f"<script>{SORT_JS}</script></body></html>\n"
    )
