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
from pathlib import Path

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


# -- job scripts: jobs/, slurm/ templates and `dataclay-hpc submit` ------------------

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted((REPO / "jobs").glob("*.sbatch"))
SUCCESS = {
    "quickstart.sbatch": "quickstart: OK",
    "move_and_versions.sbatch": "move_and_versions: OK",
    "multithreading.sbatch": "multithreading: OK",
}
JOB_DEADLINE_S = 240


def _wait_finished(job_id: str, timeout_s: float = JOB_DEADLINE_S) -> str:
    """Wait until the job leaves squeue; return `scontrol show job`."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], timeout_s=15
        ).stdout.strip()
        if not state:
            return run(["scontrol", "show", "job", job_id], timeout_s=15).stdout
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], timeout=15)
    pytest.fail(f"job {job_id} still {state} after {timeout_s} s")


def _sbatch(args: list[str], **kwargs) -> str:
    submitted = run(["sbatch", "--parsable", *args], timeout_s=30, **kwargs)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def test_every_job_in_jobs_has_a_success_line():
    assert sorted(SUCCESS) == [path.name for path in JOBS]


@pytest.mark.parametrize("job", JOBS, ids=lambda path: path.name)
def test_every_job_script_completes_from_the_repository_root(job, tmp_path):
    output = tmp_path / "job.out"
    job_id = _sbatch([f"--output={output}", f"jobs/{job.name}"], cwd=REPO)
    info = _wait_finished(job_id)
    text = output.read_text()
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + text
    assert SUCCESS[job.name] in text, text
    assert not list(REPO.glob(f"dataclay-hpc-store-{job_id}")), "store left behind"


@pytest.fixture
def weird_dir(tmp_path):
    folder = tmp_path / "it's a dir"
    folder.mkdir()
    (folder / "drv.py").write_text(
        "import sys\nfrom dataclay_hpc import Client\n"
        "with Client() as client:\n"
        "    print('args', sys.argv[1:], 'backends', len(client.get_backends()))\n"
    )
    return folder


@pytest.mark.parametrize(
    ("template", "sizes", "backends"),
    [
        ("one-node.sbatch", ["--ntasks=3"], 2),
        ("multi-node.sbatch", ["--nodes=1", "--ntasks-per-node=3"], 2),
        ("chain.sbatch", ["--ntasks=2"], 1),
    ],
)
def test_templates_run_with_small_sizes(weird_dir, template, sizes, backends):
    env = dict(os.environ, DATACLAY_HPC_PYTHON=PYTHON)
    job_id = _sbatch(
        [*sizes, "--time=5", str(REPO / "slurm" / template), PYTHON, "drv.py", "a b"],
        cwd=weird_dir,
        env=env,
    )
    info = _wait_finished(job_id)
    (output,) = weird_dir.glob(f"*{job_id}.out")
    text = output.read_text()
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + text
    assert f"args ['a b'] backends {backends}" in text, text


def test_a_chained_stage_starts_after_the_first_succeeded(weird_dir):
    env = dict(os.environ, DATACLAY_HPC_PYTHON=PYTHON)
    chain = str(REPO / "slurm" / "chain.sbatch")
    first = _sbatch(
        ["--ntasks=2", "--time=5", chain, PYTHON, "drv.py", "one"],
        cwd=weird_dir,
        env=env,
    )
    second = _sbatch(
        [
            f"--dependency=afterok:{first}",
            "--ntasks=2",
            "--time=5",
            chain,
            PYTHON,
            "drv.py",
            "two",
        ],
        cwd=weird_dir,
        env=env,
    )
    for job_id, word in ((first, "one"), (second, "two")):
        info = _wait_finished(job_id)
        text = (weird_dir / f"dataclay-hpc-chain-{job_id}.out").read_text()
        assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + text
        assert f"args ['{word}'] backends 1" in text, text


def test_dataclay_hpc_submit_runs_a_job(weird_dir):
    output = weird_dir / "out %j.txt"
    result = run(
        [
            DATACLAY_HPC,
            "submit",
            "--ntasks",
            "3",
            "--time-min",
            "5",
            "--signal-warning-s",
            "30",
            "--storage",
            str(weird_dir / "st ore"),
            "--output",
            str(output),
            "--",
            PYTHON,
            "drv.py",
            "it's",
            "a b",
        ],
        timeout_s=60,
        cwd=weird_dir,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split("submitted job ")[1].strip()
    info = _wait_finished(job_id)
    text = (weird_dir / f"out {job_id}.txt").read_text()
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + text
    assert "args [\"it's\", 'a b'] backends 2" in text, text
    assert list(weird_dir.glob("dataclay-hpc-*.sbatch"))


def test_a_refused_submission_reports_what_sbatch_said(weird_dir):
    result = run(
        [DATACLAY_HPC, "submit", "--partition", "no-such-partition", "--", "true"],
        timeout_s=60,
        cwd=weird_dir,
    )
    assert result.returncode == 2
    assert "failed with exit code 1" in result.stderr
    assert "no-such-partition" in result.stderr or "partition" in result.stderr


WARNED_DRIVER = """
import signal, sys, time
from dataclay_hpc import Client

def warned(signum, frame):
    print("driver: walltime warning, wrapping up", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, warned)
with Client() as client:
    print("ready", len(client.get_backends()), flush=True)
    time.sleep(120)
"""


def test_the_pre_walltime_signal_stops_the_job_in_order(tmp_path):
    driver = tmp_path / "warned.py"
    driver.write_text(WARNED_DRIVER)
    output = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"{DATACLAY_HPC} run --backends 2 --storage {tmp_path} -- {PYTHON} {driver}\n"
    )
    job_id = _sbatch(["-n", "3", "--time=5", f"--output={output}", str(script)])
    deadline = time.monotonic() + 120
    while "ready" not in (output.read_text() if output.exists() else ""):
        assert time.monotonic() < deadline, "the driver never started"
        time.sleep(0.2)
    # what --signal=TERM@N does at the warning time: SIGTERM to every task
    signalled = time.monotonic()
    assert run(["scancel", "--signal=TERM", job_id], timeout_s=15).returncode == 0
    info = _wait_finished(job_id, timeout_s=60)
    text = output.read_text()
    assert time.monotonic() - signalled < 30, text
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + text
    assert "ready 2" in text and "walltime warning, wrapping up" in text, text
    assert "Traceback" not in text and "ERROR" not in text, text
