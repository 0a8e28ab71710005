"""Rank 0 of a job: writes the job folder, runs the driver, stops the backends.

The driver is the user's command, run as a child process of rank 0 with
``DATACLAY_HPC_JOB`` naming the job folder, so that ``Client()`` inside it joins
the job. A job without a command serves an embedded client instead, until the
client asks it to stop or its process is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil

from . import serialization
from .context import Session
from .exceptions import DataClayException
from .job import (
    ENV_JOB,
    STOP_GRACE_S,
    JobOptions,
    make_job_dir,
    write_job_dir,
)
from .metadata import BackendInfo
from .runtime import ERROR, OK, Runtime
from .transport import RequestServer

__all__ = ["Coordinator"]

logger = logging.getLogger(__name__)

_POLL_S = 0.2
#: How long a stopping job lets its driver end on its own before it sends the
#: driver SIGTERM, in seconds (the signal that stops the job often reached the
#: driver as well).
DRIVER_OWN_STOP_S = 1.0


class Coordinator:
    """The coordinator rank.

    Args:
        job_id: The job's id.
        secret: The job's secret.
        bind_host: Address of its request server (used by embedded clients).
    """

    def __init__(self, job_id: str, secret: bytes, bind_host: str) -> None:
        self.job_id = job_id
        self._secret = secret
        self.stop_requested = threading.Event()
        self.server = RequestServer(
            self.handle, secret, bind_host, "coordinator", spin_s=0.0
        )

    def handle(
        self, payload: bytes, count: int, buffers: list[Any], answer_wanted: bool
    ):
        """Answer a request: ``shutdown`` or ``ping``."""
        (op, _username, _dataset, _args), _ = serialization.loads(
            payload, count, buffers
        )
        if op == "shutdown":
            logger.info("job %s: stop requested by the client", self.job_id)
            self.stop_requested.set()
            reply: tuple[int, Any] = (OK, None)
        elif op == "ping":
            reply = (OK, self.job_id)
        else:
            error = DataClayException(f"the coordinator does not serve {op!r}")
            reply = (ERROR, (error, "", 0, socket.gethostname()))
        return serialization.dumps(reply)

    def run(
        self,
        options: JobOptions,
        backends: Sequence[BackendInfo],
        storage: str,
        ranks: int,
        stop_asked: threading.Event,
    ) -> int:
        """Run the driver (or serve), then stop the backends; return the exit code."""
        self.server.start()
        job_dir = options.job_dir or make_job_dir(self.job_id)
        description = {
            "job_id": self.job_id,
            "ranks": ranks,
            "storage": storage,
            "coordinator": list(self.server.address),
            "backends": [b.to_dict() for b in backends],
        }
        write_job_dir(job_dir, description, self._secret)
        logger.info(
            "job %s started: rank 0 coordinator on %s, backends %s, store %s",
            self.job_id,
            socket.gethostname(),
            ", ".join(f"rank {b.rank} on {b.host}" for b in backends),
            storage,
        )
        try:
            if options.command:
                return self._run_driver(options.command, job_dir, stop_asked)
            self._serve(options.watch_pid, stop_asked)
            return 0
        finally:
            self._stop_backends(backends)
            shutil.rmtree(job_dir, ignore_errors=True)

    def close(self) -> None:
        """Stop the coordinator's request server."""
        self.server.close()
        logger.info("job %s finished", self.job_id)

    def _run_driver(
        self, command: list[str], job_dir: str, stop_asked: threading.Event
    ) -> int:
        env = dict(os.environ, **{ENV_JOB: job_dir})
        env.pop("DATACLAY_HPC_LAUNCHED", None)
        for name in ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "PMI_ID"):
            env.pop(name, None)
        try:
            driver = subprocess.Popen(command, env=env)
        except OSError as exc:
            print(
                f"dataclay-hpc: cannot start the driver {command[0]!r}: {exc}",
                flush=True,
            )
            return 127
        logger.info("driver started: %s (pid %d)", " ".join(command), driver.pid)
        while True:
            try:
                code = driver.wait(timeout=_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if stop_asked.is_set():
                    code = self._stop_driver(driver)
                    break
        logger.info("driver ended with exit code %d", code)
        return 128 - code if code < 0 else code

    @staticmethod
    def _stop_driver(driver: subprocess.Popen) -> int:
        # Slurm (scancel, --signal) and a terminal's Ctrl-C signal the driver
        # too; a second SIGTERM could hit it while it exits, after Python has
        # dropped its handlers, and turn its own exit code into a kill
        try:
            return driver.wait(timeout=DRIVER_OWN_STOP_S)
        except subprocess.TimeoutExpired:
            pass
        driver.terminate()
        try:
            return driver.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "driver ignored SIGTERM for %.0f s; killing it", STOP_GRACE_S
            )
            driver.kill()
            return driver.wait()

    def _serve(self, watch_pid: int | None, stop_asked: threading.Event) -> None:
        client = _process(watch_pid)
        while not self.stop_requested.wait(_POLL_S):
            if stop_asked.is_set():
                return
            if watch_pid is not None and not _alive(client):
                logger.info("job %s: client process %d is gone", self.job_id, watch_pid)
                return

    def _stop_backends(self, backends: Sequence[BackendInfo]) -> None:
        runtime = Runtime(self.job_id, self._secret, backends)
        runtime.inside_job = True
        session = Session(runtime, inside_job=True)
        started = time.monotonic()
        try:
            for info in backends:
                try:
                    runtime.request(info.id, "shutdown", (), session=session)
                except DataClayException as exc:
                    logger.warning(
                        "backend rank %d did not take the stop: %s", info.rank, exc
                    )
        finally:
            runtime.close()
        logger.info("backends stopped in %.2f s", time.monotonic() - started)


def _process(pid: int | None) -> psutil.Process | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _alive(process: psutil.Process | None) -> bool:
    # a killed client stays a zombie until its parent reaps it: that is gone too
    try:
        return (
            process is not None
            and process.is_running()
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return False
