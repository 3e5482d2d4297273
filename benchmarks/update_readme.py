"""Copy benchmarks/results/RESULTS.md (written by run_matrix.py) into README.md between the results markers.

    python benchmarks/update_readme.py          # after python benchmarks/run_matrix.py

The README's figures are then exactly the script's, never retyped by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- results:start -->", "<!-- results:end -->"


def splice(readme: str, results: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    body = results.split("\n", 1)[1].lstrip("\n") if results.startswith("# ") else results  # drop the H1
    body = body.replace("\n## ", "\n### ")  # nest under the README's "## Results"
    head, rest = readme.split(START, 1)
    return head + START + "\n" + body.rstrip("\n") + "\n" + END + rest.split(END, 1)[1]


def main() -> int:
    readme = HERE.parent / "README.md"
    results = HERE / "results" / "RESULTS.md"
    if not results.is_file():
        print(f"{results} is missing: run python benchmarks/run_matrix.py first", file=sys.stderr)
        return 2
    readme.write_text(splice(readme.read_text(), results.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
