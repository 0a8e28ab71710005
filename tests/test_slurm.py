"""Jobs on a real Slurm: srun started by the launcher, by the user, and by sbatch.

These tests need a running Slurm (``bash slurm/local-cluster.sh start`` sets up
a single-node one as root). Without one they are skipped, unless
``DATACLAY_HPC_REQUIRE_SLURM=1`` makes that a failure (as in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import DATACLAY_HPC, run

PYTHON = sys.executable

DRIVER = """
import os
from dataclay_hpc import Client
from models import Person
with Client() as client:
    backends = client.get_backends()
    person = Person("slurm", 1)
    person.make_persistent(backend_id=list(backends)[-1])
    assert person.birthday() == 2
    print(f"backends={len(backends)} job={os.environ.get('SLURM_JOB_ID')}")
"""


def _slurm_available() -> str | None:
    if shutil.which("sinfo") is None:
        return "no Slurm commands on PATH"
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    states = result.stdout.split()
    if result.returncode != 0 or not any(s in ("idle", "mixed") for s in states):
        said = result.stdout.strip() or result.stderr.strip()
        return f"no idle Slurm node (sinfo: {said})"
    return None


_missing = _slurm_available()
if _missing and os.environ.get("DATACLAY_HPC_REQUIRE_SLURM") == "1":
    raise RuntimeError(
        f"DATACLAY_HPC_REQUIRE_SLURM=1 but Slurm is unusable: {_missing}"
    )
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_missing is not None, reason=f"Slurm unavailable: {_missing}"),
]


@pytest.fixture
def driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.mark.parametrize("ranks", [2, 4])
def test_run_inside_an_allocation_launches_with_srun(driver, tmp_path, ranks):
    result = run(
        [
            "salloc",
            "-n",
            str(ranks),
            "--time=5",
            DATACLAY_HPC,
            "run",
            "--backends",
            str(ranks - 1),
            "--storage",
            str(tmp_path),
            "--",
            PYTHON,
            str(driver),
        ],
        timeout_s=180,
    )
    assert result.returncode == 0, result.stderr
    assert f"backends={ranks - 1} job=" in result.stdout


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_started_by_srun_take_their_role(driver, tmp_path, ranks):
    result = run(
        [
            "srun",
            "--mpi=pmi2",
            "--kill-on-bad-exit=1",
            "-n",
            str(ranks),
            "--time=5",
            PYTHON,
            "-m",
            "dataclay_hpc",
            "run",
            "--storage",
            str(tmp_path),
            "--",
            PYTHON,
            str(driver),
        ],
        timeout_s=180,
    )
    assert result.returncode == 0, result.stderr
    assert f"backends={ranks - 1} job=" in result.stdout


def test_a_batch_job_completes(driver, tmp_path):
    output = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"{DATACLAY_HPC} run --backends 3 --storage {tmp_path} -- {PYTHON} {driver}\n"
    )
    submitted = run(
        [
            "sbatch",
            "--parsable",
            "-n",
            "4",
            "--time=5",
            f"--output={output}",
            f"--chdir={tmp_path}",
            str(script),
        ],
        timeout_s=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], timeout_s=15
        ).stdout.strip()
        if not state:
            break
        time.sleep(0.2)
    else:
        subprocess.run(["scancel", job_id], timeout=15)
        pytest.fail(f"job {job_id} still {state} after 180 s")
    info = run(["scontrol", "show", "job", job_id], timeout_s=15).stdout
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    assert "backends=3 job=" + job_id in output.read_text()
