"""A throwaway dataClay 4.3.1 deployment on loopback, without docker.

Starts, in this order, each in its own process group with its log under the
work directory:

1. ``redis-server`` (the key/value store behind dataClay's metadata),
2. the metadata service, ``python -m dataclay.metadata``,
3. N backends, ``python -m dataclay.backend``,

all configured through dataClay's environment variables and bound to
127.0.0.1 on free ports. Each step is awaited with a deadline (TCP port open,
then ``python -m dataclay.control.ctl healthcheck``). :meth:`stop` ends every
process it started, in reverse order, also after a failed start.
"""

import logging
import os
import subprocess
from pathlib import Path

import proc

logger = logging.getLogger(__name__)

#: Deadline for one service to open its port, in seconds.
START_TIMEOUT_S = 60.0
#: Deadline for one ``ctl healthcheck`` call, in seconds.
HEALTHCHECK_TIMEOUT_S = 60.0
#: Grace period between SIGTERM and SIGKILL when stopping a service, in seconds.
STOP_TIMEOUT_S = 15.0


class DataClayDeployment:
    """Redis, one metadata service and ``backends`` backends on loopback.

    Use as a context manager; the services run between enter and exit.

    Args:
        venv_python: the python of the venv where dataClay 4.3.1 is installed.
        workdir: empty directory for logs, storage and the redis dump.
        model_path: directory holding the model module (put on PYTHONPATH).
        backends: number of backends to start.
    """

    def __init__(
        self, venv_python: Path, workdir: Path, model_path: Path, backends: int = 2
    ) -> None:
        """Describe the deployment; nothing starts before :meth:`start`."""
        self.venv_python = venv_python
        self.workdir = workdir
        self.model_path = model_path
        self.backends = backends
        self.host = "127.0.0.1"
        self.kv_port = 0
        self.metadata_port = 0
        self.backend_ports: list[int] = []
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> "DataClayDeployment":
        """Start every service, stopping what was started if one fails."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop every service."""
        self.stop()

    def env(self) -> dict[str, str]:
        """Return the environment shared by the services and their clients.

        Returns:
            The current environment without dataClay variables, plus the
            deployment's key/value store, metadata address, log level and
            ``PYTHONPATH``.
        """
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DATACLAY_", "DC_"))
        }
        env.update(
            {
                "DATACLAY_KV_HOST": self.host,
                "DATACLAY_KV_PORT": str(self.kv_port),
                "DATACLAY_METADATA_HOST": self.host,
                "DATACLAY_METADATA_PORT": str(self.metadata_port),
                "DATACLAY_LOGLEVEL": "WARNING",
                "PYTHONPATH": str(self.model_path),
            }
        )
        return env

    def start(self) -> None:
        """Start redis, the metadata service and the backends, and wait for each.

        Raises:
            proc.ProcessError: a service exited or was not ready in time.
        """
        self.kv_port = proc.free_port()
        self.metadata_port = proc.free_port()
        self.backend_ports = [proc.free_port() for _ in range(self.backends)]
        self._start_redis()
        self._start_metadata()
        for index, port in enumerate(self.backend_ports):
            self._start_backend(index, port)
        logger.info(
            "dataClay up: redis %s, metadata %s, backends %s",
            self.kv_port,
            self.metadata_port,
            self.backend_ports,
        )

    def stop(self) -> None:
        """Stop every started service, most recent first; safe to call twice."""
        while self._children:
            name, child = self._children.pop()
            proc.stop(name, child, STOP_TIMEOUT_S)
        logger.info("dataClay stopped")

    def _start_redis(self) -> None:
        argv = [
            "redis-server",
            "--bind", self.host,
            "--port", str(self.kv_port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        self._launch("redis", argv, self.kv_port)

    def _start_metadata(self) -> None:
        env = self.env()
        env["DATACLAY_METADATA_LISTEN_ADDRESS"] = self.host
        argv = [str(self.venv_python), "-m", "dataclay.metadata"]
        self._launch("dataclay-metadata", argv, self.metadata_port, env)
        self._healthcheck("metadata", self.metadata_port)

    def _start_backend(self, index: int, port: int) -> None:
        storage = self.workdir / f"storage-backend{index}"
        storage.mkdir()
        env = self.env()
        env.update(
            {
                "DATACLAY_BACKEND_NAME": f"bench-backend{index}",
                "DATACLAY_BACKEND_HOST": self.host,
                "DATACLAY_BACKEND_LISTEN_ADDRESS": self.host,
                "DATACLAY_BACKEND_PORT": str(port),
                "DATACLAY_STORAGE_PATH": str(storage),
            }
        )
        argv = [str(self.venv_python), "-m", "dataclay.backend"]
        self._launch(f"dataclay-backend{index}", argv, port, env)
        self._healthcheck("backend", port)

    def _launch(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        log_path = self.workdir / f"{name}.log"
        child = proc.start(
            name,
            argv,
            env=env if env is not None else self.env(),
            cwd=self.workdir,
            log_path=log_path,
        )
        self._children.append((name, child))
        proc.wait_for_port(name, port, child, log_path, START_TIMEOUT_S)

    def _healthcheck(self, service: str, port: int) -> None:
        argv = [
            str(self.venv_python), "-m", "dataclay.control.ctl", "healthcheck",
            "--host", self.host, "--service", service, "--port", str(port),
        ]  # fmt: skip
        proc.run(
            f"healthcheck of dataClay {service} on port {port}",
            argv,
            env=self.env(),
            cwd=self.workdir,
            log_path=self.workdir / f"healthcheck-{service}-{port}.log",
            timeout_s=HEALTHCHECK_TIMEOUT_S,
        )
