"""``report.html`` for a run or comparison folder: charts and tables, self-contained, offline."""

from fedchurn.reporting.page import REPORT_FILE, build_report, write_report, write_report_safely

__all__ = ["REPORT_FILE", "build_report", "write_report", "write_report_safely"]
