"""``Client``: the entry point of a program that uses persistent objects.

Inside a job (the driver of ``dataclay-hpc run``) a client joins that job.
Anywhere else it starts an embedded job of its own: ``dataclay-hpc run`` with
no command, on ``DATACLAY_HPC_BACKENDS`` backends (2 by default), which it
stops again on ``stop()``, on leaving a ``with`` block, or when the process
exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from types import TracebackType
from typing import ClassVar

from . import serialization
from .context import (
    DEFAULT_DATASET,
    DEFAULT_USERNAME,
    Session,
    current_session,
    default_session,
    set_default_session,
    set_session,
)
from .exceptions import DataClayException, JobError
from .job import (
    ENV_JOB,
    JOB_FILE,
    JobOptions,
    backends_of,
    check_backends,
    default_backends,
    default_storage,
    rank_arguments,
    read_job,
)
from .metadata import BackendInfo
from .runtime import Runtime
from .transport import Connection

__all__ = ["Client"]

logger = logging.getLogger(__name__)

EMBEDDED_START_TIMEOUT_S = 120.0
EMBEDDED_STOP_TIMEOUT_S = 60.0


class Client:
    """A session on a job: who the requests are from and which dataset they use.

    Args:
        dataset: Dataset of the objects and aliases this client makes. It
            belongs to the user who opened it first; default: the username if
            one is given, else ``admin``.
        username: User the requests are made as (default ``admin``).
        backends: Backends of an embedded job (default ``DATACLAY_HPC_BACKENDS``
            or 2); ignored inside a job.
        storage: Store folder of an embedded job; ignored inside a job.
    """

    def __init__(
        self,
        dataset: str | None = None,
        username: str | None = None,
        *,
        backends: int | None = None,
        storage: str | None = None,
    ) -> None:
        self.username = username or DEFAULT_USERNAME
        self.dataset = dataset or (username or DEFAULT_DATASET)
        self._backends = (
            None if backends is None else check_backends(backends, "backends")
        )
        self._storage = storage
        self.runtime: Runtime | None = None
        self.session: Session | None = None
        self._embedded: _EmbeddedJob | None = None
        self.job_dir: str | None = None
        self.storage: str | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        """Whether the client is started."""
        return self.runtime is not None

    def start(self) -> Client:
        """Join the job this process runs in, or start an embedded one.

        The client becomes the session of the calling context and, if the
        process has none yet, the process's default session.

        Returns:
            The client itself.

        Raises:
            JobError: The embedded job could not start.
            DatasetAccessError: The dataset belongs to another user.
        """
        if self.runtime is not None:
            return self
        job_dir = os.environ.get(ENV_JOB)
        if job_dir is None:
            self._embedded = _EmbeddedJob.join(self._backends, self._storage)
            job_dir = self._embedded.job_dir
        description, secret = read_job(job_dir)
        self.job_dir = job_dir
        self.storage = description["storage"]
        runtime = Runtime(description["job_id"], secret, backends_of(description))
        session = Session(runtime, self.username, self.dataset)
        try:
            runtime.open_dataset(self.username, self.dataset, session)
        except BaseException:
            runtime.close()
            if self._embedded is not None:
                self._embedded.leave()
                self._embedded = None
            raise
        self.runtime, self.session = runtime, session
        set_session(self.session)
        set_default_session(self.session)
        self._share_import_path()
        logger.info(
            "client joined job %s (%d backends) as %s/%s",
            description["job_id"],
            len(self.runtime.backends),
            self.username,
            self.dataset,
        )
        return self

    def stop(self) -> None:
        """Leave the job; an embedded job is stopped."""
        if self.runtime is None:
            return
        runtime, self.runtime = self.runtime, None
        runtime.close()
        if default_session() is self.session:
            set_default_session(None)
        with contextlib.suppress(DataClayException):
            if current_session() is self.session:
                set_session(None)
        if self._embedded is not None:
            self._embedded.leave()
            self._embedded = None

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the job -----------------------------------------------------------------------

    def get_backends(self) -> dict[uuid.UUID, BackendInfo]:
        """Return the job's backends, in rank order: ``backend_id -> BackendInfo``."""
        return dict(self._runtime().backends)

    def flush_all(self) -> int:
        """Write every object of every backend to the store and drop it from memory.

        The next access to an object (attribute, active method, move, a
        reference followed inside a backend) reloads it.

        Returns:
            How many objects were written.
        """
        return self._runtime().flush_all()

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise DataClayException("the client is not started; call start() first")
        return self.runtime

    def _share_import_path(self) -> None:
        # backends import model classes the way the driver does
        paths = [p for p in (sys.path[0] if sys.path else "", os.getcwd()) if p]
        paths = [os.path.abspath(p) for p in paths if os.path.isdir(p)]
        runtime = self._runtime()
        runtime.broadcast("add_sys_path", (paths,))

    def __repr__(self) -> str:
        state = "active" if self.runtime is not None else "stopped"
        return f"<Client {self.username}/{self.dataset} {state}>"


class _EmbeddedJob:
    """A job of this process's own: ``dataclay-hpc run`` without a command.

    Clients of one process that ask for the same backends and store share one
    embedded job; it stops when the last of them stops.
    """

    _lock = threading.Lock()
    _running: ClassVar[dict[tuple[int, str], _EmbeddedJob]] = {}

    @classmethod
    def join(cls, backends: int | None, storage: str | None) -> _EmbeddedJob:
        key = (
            backends or default_backends(),
            os.path.abspath(storage or default_storage()),
        )
        with cls._lock:
            job = cls._running.get(key)
            if job is None or job.process.poll() is not None:
                job = cls._running[key] = cls(*key)
            job.clients += 1
            return job

    def leave(self) -> None:
        with self._lock:
            self.clients -= 1
            if self.clients > 0:
                return
            for key, job in list(self._running.items()):
                if job is self:
                    del self._running[key]
        self._finalizer()

    def __init__(self, backends: int, storage: str) -> None:
        self.clients = 0
        self.job_dir = tempfile.mkdtemp(prefix="dataclay-hpc-embedded-")
        options = JobOptions(
            command=[],
            backends=backends,
            storage=storage,
            job_dir=self.job_dir,
            watch_pid=os.getpid(),
        )
        command = [
            sys.executable,
            "-m",
            "dataclay_hpc",
            "run",
            *rank_arguments(options),
        ]
        env = dict(os.environ)
        env.pop(ENV_JOB, None)
        paths = [p for p in (sys.path[0] if sys.path else "",) if p]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        logger.info("starting an embedded job with %d backends", backends)
        self.process = subprocess.Popen(command, env=env, start_new_session=True)
        self._finalizer = weakref.finalize(
            self, _stop_process, self.process, self.job_dir
        )
        try:
            self._wait_ready()
        except BaseException:
            self._finalizer()
            raise

    def _wait_ready(self) -> None:
        path = os.path.join(self.job_dir, JOB_FILE)
        deadline = time.monotonic() + EMBEDDED_START_TIMEOUT_S
        while not os.path.exists(path):
            code = self.process.poll()
            if code is not None:
                raise JobError(
                    f"the embedded job exited with code {code} before it was ready; "
                    "its messages above say why"
                )
            if time.monotonic() > deadline:
                raise JobError(
                    "the embedded job was not ready after "
                    f"{EMBEDDED_START_TIMEOUT_S:.0f} s; check that mpiexec works: "
                    "mpiexec -n 2 python -c pass"
                )
            time.sleep(0.02)


def _ask_to_stop(job_dir: str) -> None:
    try:
        description, secret = read_job(job_dir)
    except JobError:
        return
    host, port = description["coordinator"]
    try:
        connection = Connection((host, port), secret, "the embedded job's coordinator")
        request = ("shutdown", DEFAULT_USERNAME, DEFAULT_DATASET, ())
        connection.request(*serialization.dumps(request))
        connection.close()
    except DataClayException as exc:
        logger.warning("could not ask the embedded job to stop: %s", exc)


def _stop_process(process: subprocess.Popen, job_dir: str) -> None:
    if process.poll() is None:
        _ask_to_stop(job_dir)
    try:
        process.wait(timeout=EMBEDDED_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning("embedded job did not stop in time; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    shutil.rmtree(job_dir, ignore_errors=True)
