"""Process helpers for the benchmark runner: start, wait for and stop children.

Every child runs in its own session, so it and anything it spawns can be
signalled as one process group; every wait takes a deadline in seconds.
"""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: Lines of a child's log quoted in an error message.
LOG_TAIL_LINES = 30


class ProcessError(RuntimeError):
    """A child process failed, timed out or did not become ready."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a log file, or a note if it is missing.

    Args:
        path: the log file.
        lines: how many lines to return.

    Returns:
        The tail of the file.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def start(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
) -> subprocess.Popen[bytes]:
    """Start a long-running child in a new session, its output going to a log.

    Args:
        name: label used in log messages.
        argv: the command.
        env: the complete environment of the child.
        cwd: working directory of the child.
        log_path: file receiving the child's stdout and stderr.

    Returns:
        The running child.
    """
    logger.debug("starting %s: %s", name, " ".join(argv))
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    logger.debug("%s started with pid %s", name, child.pid)
    return child


def group_alive(pgid: int) -> bool:
    """Tell whether any process of the process group ``pgid`` still exists.

    Args:
        pgid: the process group id (the pid of the child started in a new session).

    Returns:
        True while at least one member exists.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(name: str, child: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Stop a child and its whole process group: SIGTERM, then SIGKILL.

    Args:
        name: label used in log messages.
        child: a child started with :func:`start` or :func:`run`.
        timeout_s: grace period between SIGTERM and SIGKILL.
    """
    pgid = child.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child.poll()
        if child.returncode is not None and not group_alive(pgid):
            logger.debug("%s stopped (exit code %s)", name, child.returncode)
            return
        time.sleep(0.05)

    logger.warning("%s did not stop within %.0f s; killing it", name, timeout_s)
    _signal_group(pgid, signal.SIGKILL)
    try:
        child.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        logger.warning("%s (pid %s) survived SIGKILL for 5 s", name, child.pid)


def run(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    timeout_s: float,
) -> None:
    """Run a child to completion under a deadline; leave nothing of it behind.

    Args:
        name: label used in log messages and errors.
        argv: the command.
        env: the complete environment of the child.
        cwd: working directory of the child.
        log_path: file receiving the child's stdout and stderr.
        timeout_s: deadline for the child to exit.

    Raises:
        ProcessError: the child timed out or exited with a non-zero code; the
            message quotes the end of its log.
    """
    child = start(name, argv, env=env, cwd=cwd, log_path=log_path)
    try:
        returncode = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ProcessError(
            f"{name} did not finish within {timeout_s:.0f} s; end of {log_path}:\n"
            f"{log_tail(log_path)}"
        ) from exc
    finally:
        _reap_group(name, child)

    if returncode != 0:
        raise ProcessError(
            f"{name} exited with code {returncode}; end of {log_path}:\n"
            f"{log_tail(log_path)}"
        )


def wait_for_port(
    name: str,
    port: int,
    child: subprocess.Popen[bytes],
    log_path: Path,
    timeout_s: float,
) -> None:
    """Wait until something accepts TCP connections on ``127.0.0.1:port``.

    Args:
        name: label used in errors.
        port: the port the child should listen on.
        child: the child expected to listen; its early exit ends the wait.
        log_path: the child's log, quoted in errors.
        timeout_s: deadline for the port to open.

    Raises:
        ProcessError: the child exited, or the port stayed closed until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if child.poll() is not None:
            raise ProcessError(
                f"{name} exited with code {child.returncode} before listening on "
                f"port {port}; end of {log_path}:\n{log_tail(log_path)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ProcessError(
                f"{name} not listening on port {port} after {timeout_s:.0f} s; "
                f"end of {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(0.1)


def _reap_group(name: str, child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        logger.info("stopping %s", name)
        stop(name, child)
    elif group_alive(child.pid):
        logger.warning("%s left processes behind; stopping them", name)
        stop(name, child)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)
