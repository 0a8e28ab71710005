"""Shared fixtures: real embedded jobs (mpiexec ranks) with 2 and 4 backends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataclay_hpc import Client

TESTS = Path(__file__).resolve().parent
# backends import the test models from here
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p
)
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

BIN = Path(sys.executable).parent
DATACLAY_HPC = str(BIN / "dataclay-hpc")
MPIEXEC = (
    str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else shutil.which("mpiexec")
)


@pytest.fixture(scope="session", params=[2, 4], ids=lambda n: f"{n}backends")
def client(request, tmp_path_factory) -> Iterator[Client]:
    """A started client on an embedded job of 2 or 4 backends."""
    storage = tmp_path_factory.mktemp(f"store{request.param}")
    client = Client(backends=request.param, storage=str(storage))
    client.start()
    yield client
    client.stop()


@pytest.fixture
def backend_ids(client) -> list:
    return list(client.get_backends())


def run(
    command: list[str], timeout_s: float = 120, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command with a deadline, capturing its output as text."""
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, **kwargs
    )
