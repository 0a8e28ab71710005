"""The code base stays formatted, lint-free and type-checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SOURCES = ["dataclay_hpc", "tests", "benchmarks", "examples"]


@pytest.mark.parametrize(
    "command",
    [
        [str(BIN / "ruff"), "check", *SOURCES],
        [str(BIN / "ruff"), "format", "--check", *SOURCES],
        [str(BIN / "mypy"), "--ignore-missing-imports", "dataclay_hpc"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_code_passes(command):
    result = run(command, timeout_s=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
