"""Rewrite the README's results section from the committed result files.

    python -m benchmarks.report

For each machine kind under benchmarks/results/ (the folder name without its
date), the newest results.md is copied between the README's markers, with a
link to its folder. Nothing else in the README changes.
"""

from __future__ import annotations

import re
from pathlib import Path

from .harness import RESULTS_DIR, ROOT

START, END = "<!-- results:start -->", "<!-- results:end -->"


def latest_results() -> list[Path]:
    newest: dict[str, Path] = {}
    for md in sorted(RESULTS_DIR.glob("*/results.md")):
        match = re.match(r"(.+)-(\d{4}-\d{2}-\d{2})$", md.parent.name)
        if match:
            newest[match.group(1)] = md  # sorted: the last one per kind is the newest
    return list(newest.values())


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    blocks = []
    for md in latest_results():
        folder = md.parent.relative_to(ROOT)
        blocks.append(f"#### `{folder.name}`\n\nFrom [{folder}]({folder}) ([plot]({folder}/ratios.png)).\n\n"
                      + md.read_text().strip())
    body = "\n\n".join(blocks) if blocks else "No results committed yet."
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{body}\n{END}{tail}")
    print(f"README.md: results section rewritten from {len(blocks)} result file(s)")


if __name__ == "__main__":
    main()
