"""Idempotent set-up of what the benchmark runner needs on this machine.

- a venv with dataClay 4.3.1 (and the same numpy as the current environment),
- ``redis-server`` from the Debian packages,
- ``mpi4py``, the ``mpich`` wheel (whose ``mpiexec`` runs the floor) and numpy
  in the current environment.

Each step checks first and installs only what is missing.
"""

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: The dataClay release compared against.
DATACLAY_VERSION = "4.3.1"
#: Deadline for one pip or apt-get command, in seconds.
INSTALL_TIMEOUT_S = 900.0
#: Deadline for a quick check (import probe), in seconds.
CHECK_TIMEOUT_S = 120.0


class SetupError(RuntimeError):
    """A required tool could not be installed."""


def current_mpiexec() -> Path:
    """Return the ``mpiexec`` installed beside the current interpreter.

    Returns:
        The path (it may not exist yet).
    """
    return Path(sys.executable).parent / "mpiexec"


def ensure_dataclay_venv(venv: Path) -> Path:
    """Create ``venv`` with dataClay 4.3.1 and numpy unless it already has them.

    Args:
        venv: directory of the venv.

    Returns:
        The venv's python.

    Raises:
        SetupError: pip failed, or the venv still lacks dataClay afterwards.
    """
    python = venv / "bin" / "python"
    probe = [
        str(python),
        "-c",
        "import dataclay, numpy; print(dataclay.__version__)",
    ]
    if python.exists() and _output(probe).strip() == DATACLAY_VERSION:
        logger.info("dataClay %s venv present: %s", DATACLAY_VERSION, venv)
        return python

    logger.info("creating the dataClay %s venv in %s", DATACLAY_VERSION, venv)
    if not python.exists():
        _check_call([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    _check_call([*pip, f"dataclay=={DATACLAY_VERSION}", _numpy_requirement()])
    if _output(probe).strip() != DATACLAY_VERSION:
        raise SetupError(f"dataClay {DATACLAY_VERSION} is not importable in {venv}")
    return python


def ensure_redis() -> str:
    """Install ``redis-server`` with apt-get unless it is on the PATH.

    Returns:
        The path of ``redis-server``.

    Raises:
        SetupError: it is missing and cannot be installed (not root, apt failed).
    """
    found = shutil.which("redis-server")
    if found:
        logger.info("redis-server present: %s", found)
        return found
    if os.geteuid() != 0:
        raise SetupError(
            "redis-server is missing and installing it needs root; "
            "run: apt-get install redis-server"
        )

    logger.info("installing redis-server with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _check_call(["apt-get", "update", "-qq"], env=env)
    _check_call(["apt-get", "install", "-y", "-qq", "redis-server"], env=env)
    found = shutil.which("redis-server")
    if not found:
        raise SetupError("apt-get installed redis-server but it is not on the PATH")
    return found


def ensure_mpi() -> Path:
    """Install mpi4py, the mpich wheel and numpy here unless they are present.

    Returns:
        The ``mpiexec`` of the mpich wheel.

    Raises:
        SetupError: pip failed, or ``mpiexec`` is still missing afterwards.
    """
    mpiexec = current_mpiexec()
    missing = [
        name for name in ("mpi4py", "numpy") if importlib.util.find_spec(name) is None
    ]
    if not _installed("mpich") or not mpiexec.exists():
        missing.append("mpich")
    if not missing:
        logger.info("mpi4py and mpich present: %s", mpiexec)
        return mpiexec

    logger.info("installing %s into %s", " ".join(missing), sys.prefix)
    _check_call([sys.executable, "-m", "pip", "install", "--quiet", *missing])
    importlib.invalidate_caches()
    if not mpiexec.exists():
        raise SetupError(f"the mpich wheel did not provide {mpiexec}")
    return mpiexec


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _numpy_requirement() -> str:
    # Same numpy on both sides, so array (de)serialisation costs are comparable.
    try:
        return f"numpy=={importlib.metadata.version('numpy')}"
    except importlib.metadata.PackageNotFoundError:
        return "numpy"


def _check_call(argv: list[str], env: dict[str, str] | None = None) -> None:
    logger.debug("running %s", " ".join(argv))
    try:
        result = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SetupError(
            f"{' '.join(argv)} did not finish within {INSTALL_TIMEOUT_S:.0f} s"
        ) from exc
    if result.returncode != 0:
        raise SetupError(
            f"{' '.join(argv)} exited with code {result.returncode}:\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )


def _output(argv: list[str]) -> str:
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""
