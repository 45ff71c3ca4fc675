"""The README's python blocks run as written (a reader copies them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no python block to run"


# Blocks that import an optional package (requirements-dev.txt installs them) are skipped without it.
OPTIONAL = ("peft", "transformers", "safetensors")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_alone(index, monkeypatch, tmp_path):
    """Each block on its own, in a fresh namespace, as a reader pastes it; files it writes land in a temporary
    folder."""
    block = BLOCKS[index]
    for module in OPTIONAL:
        if re.search(rf"^\s*(from|import) {module}\b", block, flags=re.M):
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
