"""The launcher and the job's life: roles, exit codes, failures, signals, security."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import DATACLAY_HPC, MPIEXEC, run
from models import Person

from dataclay_hpc import Client, transport
from dataclay_hpc.exceptions import BackendUnavailableError
from dataclay_hpc.transport import Connection

PYTHON = sys.executable

DRIVER = """
import os, sys
from dataclay_hpc import Client
from models import Person
with Client() as client:
    backends = client.get_backends()
    person = Person("drv", 1)
    person.make_persistent(alias="drv", backend_id=list(backends)[-1])
    assert Person.get_by_alias("drv").birthday() == 2
    job_dir = os.environ["DATACLAY_HPC_JOB"]
    mode = os.stat(os.path.join(job_dir, "secret")).st_mode & 0o777
    print(f"backends={len(backends)} secret_mode={mode:o} job_dir={job_dir}")
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


def leftovers(marker: str) -> list[psutil.Process]:
    """Processes whose command line mentions ``marker`` (besides this one)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid != os.getpid() and marker in " ".join(
            process.info["cmdline"] or []
        ):
            found.append(process)
    return found


def wait_gone(marker: str, timeout_s: float = 20) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = leftovers(marker)
        if not alive:
            return []
        time.sleep(0.2)
    return leftovers(marker)


@pytest.fixture
def driver(tmp_path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.mark.parametrize("backends", [1, 3], ids=["2ranks", "4ranks"])
def test_run_launches_the_ranks_and_returns_the_drivers_exit_code(
    driver, tmp_path, backends
):
    storage = tmp_path / "store"
    result = run(
        [
            DATACLAY_HPC,
            "run",
            "--backends",
            str(backends),
            "--storage",
            str(storage),
            "--",
            PYTHON,
            str(driver),
            "3",
        ]
    )
    assert result.returncode == 3, result.stderr
    assert f"backends={backends} secret_mode=600" in result.stdout
    job_dir = result.stdout.split("job_dir=")[1].split()[0]
    assert not os.path.exists(job_dir)  # the job folder goes with the job
    assert result.stderr == ""
    assert wait_gone(str(storage)) == []


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_started_by_mpiexec_take_their_role(driver, tmp_path, ranks):
    storage = tmp_path / "store"
    result = run(
        [
            MPIEXEC,
            "-n",
            str(ranks),
            PYTHON,
            "-m",
            "dataclay_hpc",
            "run",
            "--storage",
            str(storage),
            "--",
            PYTHON,
            str(driver),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert f"backends={ranks - 1} " in result.stdout


def test_python_m_is_the_same_command(driver, tmp_path):
    result = run(
        [
            PYTHON,
            "-m",
            "dataclay_hpc",
            "run",
            "--storage",
            str(tmp_path),
            "--",
            PYTHON,
            str(driver),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "backends=2 " in result.stdout  # DATACLAY_HPC_BACKENDS default


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--backends", "0", "--", "true"], "at least 1; got '0'"),
        (["--backends", "two", "--", "true"], "got 'two'"),
        ([], "run needs a command"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(arguments, message):
    result = run([DATACLAY_HPC, "run", *arguments], timeout_s=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_world_that_does_not_fit_is_refused_at_once(tmp_path):
    started = time.monotonic()
    result = run(
        [
            MPIEXEC,
            "-n",
            "3",
            PYTHON,
            "-m",
            "dataclay_hpc",
            "run",
            "--backends",
            "4",
            "--storage",
            str(tmp_path),
            "--",
            "true",
        ],
        timeout_s=60,
    )
    assert result.returncode != 0
    assert "--backends 4 needs 5 ranks" in result.stderr
    assert "start it with -n 5" in result.stderr
    assert time.monotonic() - started < 30


def test_a_driver_that_cannot_start(tmp_path):
    result = run(
        [DATACLAY_HPC, "run", "--storage", str(tmp_path), "--", str(tmp_path / "nope")]
    )
    assert result.returncode == 127
    assert "cannot start the driver" in result.stdout + result.stderr


def test_an_error_on_the_ranks_ends_the_job_naming_rank_and_host(driver, tmp_path):
    started = time.monotonic()
    result = run(
        [DATACLAY_HPC, "run", "--storage", str(tmp_path), "--", PYTHON, str(driver)],
        env=dict(os.environ, DATACLAY_HPC_INTERFACE="no-such-nic0"),
    )
    assert result.returncode != 0
    assert f"on host {socket.gethostname()} failed" in result.stderr
    assert "no-such-nic0" in result.stderr and "interfaces here:" in result.stderr
    assert time.monotonic() - started < 30
    assert wait_gone(str(tmp_path)) == []


def test_a_crashed_backend_ends_the_whole_job(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(
        "import time\n"
        "from dataclay_hpc import Client\n"
        "from models import Person\n"
        "client = Client().start()\n"
        "person = Person('x', 1)\n"
        "person.make_persistent(backend_id=list(client.get_backends())[0])\n"
        "try:\n"
        "    person.crash(9)\n"
        "except Exception as exc:\n"
        "    print('driver saw', type(exc).__name__, exc, flush=True)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    result = run(
        [DATACLAY_HPC, "run", "--storage", str(tmp_path), "--", PYTHON, str(script)]
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 30
    assert wait_gone(str(tmp_path)) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_stops_every_rank_cleanly(tmp_path, signum):
    script = tmp_path / "sleepy.py"
    script.write_text(
        "import time\n"
        "from dataclay_hpc import Client\n"
        "client = Client().start()\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen(
        [
            DATACLAY_HPC,
            "run",
            "--backends",
            "3",
            "--storage",
            str(tmp_path),
            "--",
            PYTHON,
            str(script),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        started = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)  # Ctrl-C reaches the whole group
        else:
            process.send_signal(signum)
        code = process.wait(timeout=60)
        assert time.monotonic() - started < 20
        assert code == 128 + signum or code == 128 + signal.SIGTERM
        stderr = process.stderr.read()
        # the driver may show its own KeyboardInterrupt; the job itself stays quiet
        assert "dataclay_hpc" not in stderr and "ERROR" not in stderr, stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert wait_gone(str(tmp_path)) == []


def test_an_embedded_job_leaves_nothing_behind(tmp_path):
    client = Client(backends=2, storage=str(tmp_path))
    client.start()
    job_dir = client.job_dir
    pids = [info.pid for info in client.get_backends().values()]
    client.stop()
    assert not os.path.exists(job_dir)
    assert wait_gone(str(tmp_path)) == []
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_an_embedded_job_ends_when_its_client_process_dies(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(
        "import os, time\n"
        "from dataclay_hpc import Client\n"
        "client = Client().start()\n"
        "print('ready', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    result = run(
        [PYTHON, str(script)], env=dict(os.environ, DATACLAY_HPC_STORAGE=str(tmp_path))
    )
    assert result.returncode == -9 and "ready" in result.stdout
    assert wait_gone(str(tmp_path), timeout_s=30) == []


def test_a_peer_without_the_secret_is_refused_before_anything_is_read(client):
    info = next(iter(client.get_backends().values()))
    with pytest.raises(BackendUnavailableError, match="refused"):
        Connection(info.address, b"wrong" * 7, "backend")
    with socket.create_connection(info.address, timeout=10) as raw:
        raw.recv(32)  # the challenge
        raw.sendall(b"\x80\x05" + b"garbage" * 20)  # a pickle, not an answer
        assert raw.recv(16) == b""  # dropped unread
    person = Person("safe", 1)
    person.make_persistent(backend_id=info.id)
    assert person.age == 1


def test_idle_backends_use_next_to_no_cpu(client):
    processes = [psutil.Process(info.pid) for info in client.get_backends().values()]
    before = [sum(p.cpu_times()[:2]) for p in processes]
    time.sleep(2.0)
    after = [sum(p.cpu_times()[:2]) for p in processes]
    for start, end in zip(before, after, strict=True):
        assert (end - start) / 2.0 < 0.05


def test_backends_go_quiet_right_after_a_burst_of_requests(client, backend_ids):
    # a backend polls for the next request for DATACLAY_HPC_SPIN_US after each
    # answer; that must not turn into polling while nothing arrives
    processes = [psutil.Process(info.pid) for info in client.get_backends().values()]
    people = [Person(f"burst{i}", i) for i in range(len(backend_ids))]
    for person, backend_id in zip(people, backend_ids, strict=True):
        person.make_persistent(backend_id=backend_id)
    for _ in range(300):
        for person in people:
            assert person.age >= 0
    before = [sum(p.cpu_times()[:2]) for p in processes]
    driver_before = sum(psutil.Process().cpu_times()[:2])
    time.sleep(2.0)
    after = [sum(p.cpu_times()[:2]) for p in processes]
    driver_after = sum(psutil.Process().cpu_times()[:2])
    for start, end in zip(before, after, strict=True):
        assert (end - start) / 2.0 < 0.05
    assert (driver_after - driver_before) / 2.0 < 0.05


def test_a_caller_stops_polling_through_long_active_methods(client):
    # a caller polls up to DATACLAY_HPC_SPIN_US (1 ms) for its answer; once an
    # answer took longer, it polls only briefly until answers are quick again
    person = Person("sleeper", 1)
    person.make_persistent()
    calls = 20
    person.nap(0.02)  # the one answer polled for in full
    spent = time.thread_time()
    for _ in range(calls):
        person.nap(0.02)
    polled_ms = (time.thread_time() - spent) * 1e3
    # polling 1 ms for each answer would take at least 20 ms of this thread
    assert polled_ms < calls * 0.5, polled_ms
    connection = client.runtime._connection(person._dc_meta.master_backend_id)
    assert connection._spin_s == transport.SERVER_SPIN_S
    # the first answer within 1 ms restores full polls (a busy machine may
    # make a few slower)
    for _ in range(200):
        assert person.age == 1
        if connection._spin_s == transport.SPIN_S:
            break
    assert connection._spin_s == transport.SPIN_S


@pytest.mark.parametrize("spin_us", ["0", "500"])
def test_a_job_runs_with_polling_off_or_long(tmp_path, spin_us):
    script = tmp_path / "app.py"
    script.write_text(
        "from dataclay_hpc import Client\n"
        "from models import Person\n"
        "with Client():\n"
        "    person = Person('poll', 1)\n"
        "    person.make_persistent()\n"
        "    for _ in range(50):\n"
        "        person.birthday()\n"
        "    print('age', person.age)\n"
    )
    env = dict(
        os.environ, DATACLAY_HPC_STORAGE=str(tmp_path), DATACLAY_HPC_SPIN_US=spin_us
    )
    result = run([PYTHON, str(script)], env=env)
    assert result.returncode == 0, result.stderr
    assert "age 51" in result.stdout


def test_a_bad_polling_time_is_refused_naming_the_variable(tmp_path):
    env = dict(os.environ, DATACLAY_HPC_SPIN_US="-5")
    result = run([PYTHON, "-c", "import dataclay_hpc"], env=env)
    assert result.returncode != 0
    assert "DATACLAY_HPC_SPIN_US must be a number of at least 0; got '-5'" in (
        result.stderr
    )


def test_the_secret_file_is_private(client):
    secret = Path(client.job_dir) / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_a_second_program_joins_a_running_job(client, backend_ids):
    person = Person("Zoe", 3)
    alias = f"zoe-{os.getpid()}-{time.monotonic_ns()}"
    person.make_persistent(alias=alias, backend_id=backend_ids[-1])
    script = (
        "from dataclay_hpc import Client\n"
        "from models import Person\n"
        "with Client():\n"
        f"    zoe = Person.get_by_alias({alias!r})\n"
        "    print(zoe._dc_meta.dataset_name, sorted(zoe.get_aliases()), zoe.age)\n"
        "    zoe.age = 4\n"
    )
    result = run(
        [PYTHON, "-c", script], env=dict(os.environ, DATACLAY_HPC_JOB=client.job_dir)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["admin", f"['{alias}']", "3"]
    assert person.age == 4


def test_a_class_of_the_drivers_main_is_refused_with_the_fix(tmp_path):
    script = tmp_path / "main_class.py"
    script.write_text(
        "from dataclay_hpc import Client, DataClayObject\n"
        "from dataclay_hpc.exceptions import ClassImportError\n"
        "class Local(DataClayObject):\n"
        "    value: int\n"
        "with Client():\n"
        "    obj = Local()\n"
        "    obj.value = 1\n"
        "    try:\n"
        "        obj.make_persistent()\n"
        "    except ClassImportError as exc:\n"
        "        print('refused:', exc)\n"
        "    print('volatile:', not obj._dc_is_registered, obj.value)\n"
    )
    result = run(
        [PYTHON, str(script)], env=dict(os.environ, DATACLAY_HPC_STORAGE=str(tmp_path))
    )
    assert result.returncode == 0, result.stderr
    assert "refused: class Local is defined in the script's __main__" in result.stdout
    assert "move the class into a module" in result.stdout
    assert "volatile: True 1" in result.stdout


def test_a_request_over_its_deadline_is_a_clear_error(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(
        "from dataclay_hpc import Client\n"
        "from dataclay_hpc.exceptions import BackendUnavailableError\n"
        "from models import Person\n"
        "with Client():\n"
        "    person = Person('slow', 1)\n"
        "    person.make_persistent()\n"
        "    try:\n"
        "        person.nap(3)\n"
        "    except BackendUnavailableError as exc:\n"
        "        print('error:', exc)\n"
        "    print('age', person.age)\n"
    )
    env = dict(
        os.environ,
        DATACLAY_HPC_STORAGE=str(tmp_path),
        DATACLAY_HPC_REQUEST_TIMEOUT_S="0.5",
    )
    result = run([PYTHON, str(script)], env=env)
    assert result.returncode == 0, result.stderr
    assert (
        "did not answer within 0.5 s (DATACLAY_HPC_REQUEST_TIMEOUT_S)" in result.stdout
    )
    assert "age 1" in result.stdout
