"""The README's first two command blocks are what CI runs (install + demo, tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    """Each Python block of the README runs as written (on the bundled demo experts), in a fresh
    namespace in an empty directory; about 20 s for the 3-layer arrangement."""
    from stage_stack.instruments import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "drums.safetensors").is_file():
        pytest.skip(f"the bundled demo experts are missing from {WEIGHTS_DIR}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STAGE_STACK_REGISTRY", raising=False)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(python_blocks()[index], f"README.md python block {index + 1}", "exec"), namespace)
    if "song" in namespace:
        assert namespace["song"].mix.shape[-1] == int(round(namespace["song"].manifest.duration *
                                                            namespace["song"].sample_rate))
    if "audio" in namespace:
        assert tuple(namespace["audio"].shape[:2]) == (2, 1)
