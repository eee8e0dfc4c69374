"""The README's first two command blocks are what CI runs (install + demo, tests)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command_blocks() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S)
    return [[line.strip() for line in b.splitlines() if line.strip() and not line.strip().startswith("#")]
            for b in blocks]


def test_readme_starts_with_install_and_test_commands():
    blocks = command_blocks()
    assert len(blocks) >= 2
    install, tests = blocks[0], blocks[1]
    assert any("pip install" in line and "stage-stack" in line for line in install), install
    assert any("pytest" in line for line in tests), tests


def test_ci_runs_the_readme_commands_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    blocks = command_blocks()
    for line in blocks[0] + blocks[1]:
        if line.startswith(("python3 -m venv", ". .venv", "source .venv")):
            continue  # CI makes its own venv the same way, a line apart
        assert line in (c.strip() for c in ci), f"README line not run by .ci/run: {line}"
