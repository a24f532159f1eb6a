"""The HTML report of a study: data computed first (``info``), then drawn (``render``) or printed (``summary``)."""

from __future__ import annotations

from cotune.report.info import ReportInfo, report_info

__all__ = ["ReportInfo", "report_info"]
