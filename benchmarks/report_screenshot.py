"""A picture of a real report for the README: `vitexport build` on the shipped default, opened in a real browser.

    python benchmarks/report_screenshot.py                       # build (about 5 min on 2 cores), then screenshot
    python benchmarks/report_screenshot.py --report-dir DIST     # an existing build's report, rendered again from
                                                                 # its report.json by this checkout's html.py

Writes benchmarks/results/report.png (headless Debian chromium, 1600 px wide) and benchmarks/results/report-default.json
(the report it shows). Needs chromium (`apt-get install chromium`) and the report extra (matplotlib) for the plots.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def screenshot(page: Path, png: Path, width: int = 1600, height: int = 1800) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("report_screenshot.py: chromium is not installed (apt-get install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if not png.is_file():
        sys.exit(f"report_screenshot.py: chromium wrote no screenshot: {res.stderr[-1000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report-dir", type=Path, help="an existing build output with report.html (default: build the shipped default first)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "report-default", help="where the build goes (default: benchmarks/out/report-default)")
    args = ap.parse_args()
    dist = args.report_dir
    if dist is None:
        dist = args.out
        cmd = [sys.executable, "-m", "vitexport.cli", "build", "--out", str(dist), "--force"]
        print("+ vitexport build --out", dist, "--force", file=sys.stderr)
        subprocess.run(cmd, check=True, cwd=REPO)
        page = dist / "report.html"
    else:
        import json

        from vitexport.harness.html import render_html
        from vitexport.harness.report import Report

        page = HERE / "out" / "report-rerendered.html"  # never write into the build's folder
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(render_html(Report.from_dict(json.loads((dist / "report.json").read_text()))), encoding="utf-8")
    screenshot(page, HERE / "results" / "report.png")
    shutil.copy(dist / "report.json", HERE / "results" / "report-default.json")
    print(f"wrote {HERE / 'results' / 'report.png'} from {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
