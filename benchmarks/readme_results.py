"""Rewrite the README's results section from the committed result files.

    python -m benchmarks.readme_results

For each machine kind under benchmarks/results/ (the folder name without its
date), the newest results.md is copied between the README's markers, with a
link to its folder. Nothing else in the README changes.
"""

from __future__ import annotations

import re
from pathlib import Path

from .harness import RESULTS_DIR, ROOT
from .tables import LINEAR_MEMORY_HEADING, LINEAR_TIME_HEADING

START, END = "<!-- results:start -->", "<!-- results:end -->"


def latest_results() -> list[Path]:
    newest: dict[str, Path] = {}
    for md in sorted(RESULTS_DIR.glob("*/results.md")):
        match = re.match(r"(.+)-(\d{4}-\d{2}-\d{2})$", md.parent.name)
        if match:
            newest[match.group(1)] = md  # sorted: the last one per kind is the newest
    return list(newest.values())


LINEAR_HEADINGS = (LINEAR_TIME_HEADING, LINEAR_MEMORY_HEADING)


def _without_linear_tables(markdown: str, link: str) -> str:
    """The report minus its LoRA-linear tables (each a heading paragraph and a table), with a link to them."""
    paragraphs = markdown.split("\n\n")
    kept, dropped, skip_table = [], 0, False
    for paragraph in paragraphs:
        if paragraph.startswith(LINEAR_HEADINGS):
            skip_table, dropped = True, dropped + 1
            continue
        if skip_table and paragraph.startswith("|"):
            skip_table = False
            continue
        skip_table = False
        kept.append(paragraph)
    if dropped:
        kept.insert(1, f"The LoRA-linear sweep of this run (ranks 8–128, bf16, loralib) is in [results.md]({link}).")
    return "\n\n".join(kept)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    blocks = []
    for md in latest_results():
        folder = md.parent.relative_to(ROOT)
        text_md = md.read_text().strip()
        if "-full-" in folder.name:  # the long sweep's linear tables stay in its own file
            text_md = _without_linear_tables(text_md, f"{folder}/results.md")
        blocks.append(f"#### `{folder.name}`\n\nFrom [{folder}]({folder}) ([plot]({folder}/ratios.png)).\n\n"
                      + text_md)
    body = "\n\n".join(blocks) if blocks else "No results committed yet."
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{body}\n{END}{tail}")
    print(f"README.md: results section rewritten from {len(blocks)} result file(s)")


if __name__ == "__main__":
    main()
