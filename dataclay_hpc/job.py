"""One job: launching its ranks, giving each its role, and ending it.

``dataclay-hpc run`` started outside MPI launches itself again on ``B + 1``
ranks (``srun`` inside a Slurm allocation, ``mpiexec`` elsewhere). Started as a
rank, it takes its role from the rank number:

* rank 0 is the *coordinator*: it makes the job's secret, writes the job
  folder (``job.json`` and the secret, mode 0600), runs the user's command as
  the *driver* and, when the driver ends, stops every backend;
* every other rank is a *backend* (``backend.Backend``).

MPI is used for what it does best: the ranks exchange their addresses with one
``allgather`` and meet in a final barrier, which they poll with a sleeping
back-off, so no rank ever spins in a blocking MPI call. An uncaught error on
any rank is logged with rank and host, and aborts the whole job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from .exceptions import JobError
from .metadata import BackendInfo

__all__ = ["JobOptions", "launch", "read_job", "run_rank", "under_mpi_launcher"]

logger = logging.getLogger(__name__)

ENV_JOB = "DATACLAY_HPC_JOB"
ENV_BACKENDS = "DATACLAY_HPC_BACKENDS"
ENV_STORAGE = "DATACLAY_HPC_STORAGE"
ENV_INTERFACE = "DATACLAY_HPC_INTERFACE"
ENV_LAUNCHED = "DATACLAY_HPC_LAUNCHED"
ENV_LOG_LEVEL = "DATACLAY_HPC_LOG_LEVEL"

DEFAULT_BACKENDS = 2
DEFAULT_STORAGE = "dataclay-hpc-store"
JOB_FILE = "job.json"
SECRET_FILE = "secret"

# variables a process launcher sets in every rank it starts
_LAUNCHER_MARKERS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")
STOP_GRACE_S = 10.0
BARRIER_TIMEOUT_S = 60.0
SHUTDOWN_REQUEST_TIMEOUT_S = 30.0
_POLL_S = 0.2


@dataclasses.dataclass
class JobOptions:
    """What ``dataclay-hpc run`` was asked for.

    Attributes:
        command: The driver command; empty for a job that serves an embedded
            client until it is asked to stop.
        backends: Number of backends, ``None`` for the default.
        storage: Folder of the job's store.
        job_dir: Folder for ``job.json`` and the secret; a fresh temporary one
            when ``None``.
        watch_pid: End the job when this process is gone (embedded clients).
        log_level: Logging level of every rank.
    """

    command: list[str]
    backends: int | None = None
    storage: str | None = None
    job_dir: str | None = None
    watch_pid: int | None = None
    log_level: str | None = None


def under_mpi_launcher() -> bool:
    """Whether this process is a rank started by mpiexec or srun."""
    if os.environ.get(ENV_LAUNCHED) == "1":
        return True
    if any(name in os.environ for name in _LAUNCHER_MARKERS):
        return True
    # srun sets SLURM_STEP_ID in its tasks, not in the batch script itself
    return "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ


def default_backends() -> int:
    """Backends for a job that does not say: ``DATACLAY_HPC_BACKENDS`` or 2."""
    raw = os.environ.get(ENV_BACKENDS)
    if raw is None:
        return DEFAULT_BACKENDS
    return check_backends(raw, ENV_BACKENDS)


def check_backends(value: Any, source: str = "--backends") -> int:
    """Return ``value`` as a number of backends, or raise ``JobError``."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or str(value).strip() != str(count):
        raise JobError(
            f"{source} must be a whole number of backends, at least 1; got "
            f"{value!r}: pass for example {source.split()[0]}=2"
        )
    return count


def default_storage() -> str:
    """Return the store folder of a job that does not name one."""
    return os.path.abspath(os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE)


def read_job(job_dir: str) -> tuple[dict[str, Any], bytes]:
    """Return the description and the secret of a running job.

    Raises:
        JobError: The folder holds no job.
    """
    try:
        with open(os.path.join(job_dir, JOB_FILE)) as file:
            description = json.load(file)
        with open(os.path.join(job_dir, SECRET_FILE), "rb") as file:
            secret = file.read()
    except OSError as exc:
        raise JobError(
            f"no running job in {job_dir!r} ({exc}); {ENV_JOB} must name the job "
            "folder of a running `dataclay-hpc run`"
        ) from exc
    return description, secret


def backends_of(description: dict[str, Any]) -> list[BackendInfo]:
    """Return the ``BackendInfo`` of every backend in a job description."""
    return [BackendInfo.from_dict(entry) for entry in description["backends"]]


# -- launching ----------------------------------------------------------------------


def _find_mpiexec() -> str:
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside_python, os.X_OK):
        return beside_python
    found = shutil.which("mpiexec")
    if found is None:
        raise JobError(
            "no mpiexec found beside the Python interpreter or on PATH; install the "
            "MPI wheel (pip install 'dataclay-hpc[mpich]') or load the site's MPI"
        )
    return found


def rank_arguments(options: JobOptions) -> list[str]:
    """Return the ``dataclay-hpc run`` arguments every rank is started with."""
    arguments = ["--backends", str(options.backends or default_backends())]
    if options.storage is not None:
        arguments += ["--storage", os.path.abspath(options.storage)]
    if options.job_dir is not None:
        arguments += ["--job-dir", options.job_dir]
    if options.watch_pid is not None:
        arguments += ["--watch-pid", str(options.watch_pid)]
    if options.log_level is not None:
        arguments += ["--log-level", options.log_level]
    return [*arguments, "--", *options.command]


def launch_command(options: JobOptions) -> list[str]:
    """Return the command that starts the job's ranks (srun or mpiexec)."""
    backends = options.backends or default_backends()
    ranks = str(backends + 1)
    inner = [sys.executable, "-m", "dataclay_hpc", "run", *rank_arguments(options)]
    if "SLURM_JOB_ID" in os.environ and shutil.which("srun"):
        return ["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", "-n", ranks, *inner]
    return [_find_mpiexec(), "-n", ranks, *inner]


def launch(options: JobOptions) -> int:
    """Start the job's ranks, wait for them, and return the driver's exit code."""
    command = launch_command(options)
    env = dict(os.environ, **{ENV_LAUNCHED: "1"})
    logger.info("launching: %s", " ".join(command))
    process = subprocess.Popen(command, env=env)
    stop_asked = threading.Event()

    def forward(signum: int, frame: Any) -> None:
        # Ctrl-C already reached the launcher's children (same process group)
        if signum != signal.SIGINT:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
        stop_asked.set()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return _exit_code(process.wait(timeout=_POLL_S))
            except subprocess.TimeoutExpired:
                if stop_asked.is_set():
                    break
        try:
            return _exit_code(process.wait(timeout=3 * STOP_GRACE_S))
        except subprocess.TimeoutExpired:
            logger.error("job did not stop within %.0f s; killing it", 3 * STOP_GRACE_S)
            process.kill()
            return _exit_code(process.wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


# -- inside a rank --------------------------------------------------------------------


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.host = socket.gethostname()

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        record.host = self.host
        return True


def _configure_logging(rank: int, level: str | None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s dataclay-hpc rank %(rank)s %(host)s pid %(process)d "
            "%(threadName)s %(name)s %(levelname)s: %(message)s"
        )
    )
    package = logging.getLogger("dataclay_hpc")
    package.addHandler(handler)
    package.setLevel((level or os.environ.get(ENV_LOG_LEVEL) or "WARNING").upper())


def _check_world(size: int, backends: int | None) -> None:
    if size < 2:
        tasks = os.environ.get("SLURM_NTASKS")
        hint = (
            f"; SLURM_NTASKS is {tasks}, so the MPI library did not get Slurm's "
            "process manager: start it with srun --mpi=pmi2"
            if tasks and tasks != "1"
            else ": start it with mpiexec -n 3 (or srun -n 3), or run "
            "`dataclay-hpc run` outside MPI and let it launch the ranks"
        )
        raise JobError(
            f"a job needs at least 2 ranks (1 coordinator + 1 backend), found "
            f"{size}{hint}"
        )
    if backends is not None and backends != size - 1:
        raise JobError(
            f"--backends {backends} needs {backends + 1} ranks (1 coordinator + "
            f"{backends} backends) but the job has {size}: start it with "
            f"-n {backends + 1}, or drop --backends"
        )


def _interface_address(name: str) -> str:
    import psutil

    for entry in psutil.net_if_addrs().get(name, []):
        if entry.family == socket.AF_INET:
            return entry.address
    known = ", ".join(sorted(psutil.net_if_addrs()))
    raise JobError(
        f"{ENV_INTERFACE}={name!r} is not an IPv4 network interface of "
        f"{socket.gethostname()}; interfaces here: {known}"
    )


def _addresses(single_host: bool) -> tuple[str, str]:
    """Return (address to bind, address to advertise) for this rank."""
    interface = os.environ.get(ENV_INTERFACE)
    if interface:
        address = _interface_address(interface)
        return address, address
    if single_host:
        return "127.0.0.1", "127.0.0.1"
    address = socket.gethostbyname(socket.gethostname())
    return address, address


def _polled_barrier(comm: Any, timeout_s: float, what: str) -> None:
    request = comm.Ibarrier()
    deadline = time.monotonic() + timeout_s
    delay = 1e-4
    while not request.Test():
        if time.monotonic() > deadline:
            raise JobError(
                f"rank {comm.rank} waited {timeout_s:.0f} s at the {what} barrier for "
                "the other ranks; one of them is stuck or gone"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def run_rank(options: JobOptions) -> int:
    """Run this rank's role in the job and return its exit code."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.rank
    _configure_logging(rank, options.log_level)
    try:
        return _run_role(comm, options)
    except BaseException as exc:
        host = socket.gethostname()
        logger.error("rank %d on %s failed: %r", rank, host, exc, exc_info=True)
        print(
            f"dataclay-hpc: rank {rank} on host {host} failed: "
            f"{type(exc).__name__}: {exc}; aborting the job",
            file=sys.stderr,
            flush=True,
        )
        comm.Abort(1)
        return 1


def _run_role(comm: Any, options: JobOptions) -> int:
    rank, size = comm.rank, comm.size
    _check_world(size, options.backends)
    stop_asked = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("rank %d got signal %d, stopping", rank, signum)
        stop_asked.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    hosts = comm.allgather(socket.gethostname())
    bind, advertise = _addresses(len(set(hosts)) == 1)
    setup = None
    if rank == 0:
        setup = (
            secrets.token_bytes(32),
            uuid.uuid4().hex[:12],
            os.path.abspath(options.storage or default_storage()),
        )
    secret, job_id, storage = comm.bcast(setup, root=0)

    if rank == 0:
        from .coordinator import Coordinator

        coordinator = Coordinator(job_id, secret, bind)
        infos = comm.allgather(None)
        backends = [info for info in infos if info is not None]
        try:
            code = coordinator.run(options, backends, storage, size, stop_asked)
        finally:
            _polled_barrier(comm, BARRIER_TIMEOUT_S, "shutdown")
            coordinator.close()
        return code

    from .backend import Backend
    from .runtime import Runtime

    backend = Backend(rank, secret, storage, bind, advertise)
    backend.start()
    infos = comm.allgather(backend.info)
    backend.attach(Runtime(job_id, secret, [i for i in infos if i is not None]))
    try:
        _serve_until_stopped(backend, stop_asked)
    finally:
        _polled_barrier(comm, BARRIER_TIMEOUT_S, "shutdown")
        backend.close()
    return 0


def _serve_until_stopped(backend: Any, stop_asked: threading.Event) -> None:
    signalled_at: float | None = None
    while not backend.stopped.wait(_POLL_S):
        if stop_asked.is_set():
            # the coordinator stops the backends; give it time to do so in order
            signalled_at = signalled_at or time.monotonic()
            if time.monotonic() - signalled_at > 2 * STOP_GRACE_S:
                logger.warning(
                    "backend rank %d: no stop request within %.0f s of a signal; "
                    "stopping on its own",
                    backend.rank,
                    2 * STOP_GRACE_S,
                )
                return


def write_job_dir(job_dir: str, description: dict[str, Any], secret: bytes) -> None:
    """Write ``job.json`` and the secret (mode 0600) into ``job_dir``."""
    os.makedirs(job_dir, mode=0o700, exist_ok=True)
    secret_path = os.path.join(job_dir, SECRET_FILE)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(secret)
    temporary = os.path.join(job_dir, JOB_FILE + ".tmp")
    with open(temporary, "w") as file:
        json.dump(description, file, indent=1)
    os.replace(temporary, os.path.join(job_dir, JOB_FILE))


def make_job_dir(job_id: str) -> str:
    """Create a private temporary folder for a job."""
    return tempfile.mkdtemp(prefix=f"dataclay-hpc-{job_id}-")
