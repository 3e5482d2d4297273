"""A report's files, side by side: report.json (the source of truth), report.md and report.html.

Its own module so that report.py (the data and its tables) and html.py (which renders them) import in one direction.
"""

from __future__ import annotations

from pathlib import Path

from .html import render_html
from .report import Report, render_markdown


def write(report: Report, out_dir: Path) -> None:
    # UTF-8 whatever the locale; a path that is not valid UTF-8 is written escaped rather than failing the build
    (out_dir / "report.json").write_text(report.to_json(), encoding="utf-8", errors="backslashreplace")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8", errors="backslashreplace")
    (out_dir / "report.html").write_text(render_html(report), encoding="utf-8", errors="backslashreplace")
