"""The ``dataclay-hpc`` command line.

``dataclay-hpc run [--backends B] [--storage DIR] [--] CMD ...`` runs CMD as the
driver of a job with B backends; the exit code is CMD's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .exceptions import JobError
from .job import JobOptions, check_backends, launch, run_rank, under_mpi_launcher

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataclay-hpc",
        description="Persistent active objects on the MPI ranks of one job.",
    )
    commands = parser.add_subparsers(dest="command_name", required=True)
    run = commands.add_parser(
        "run",
        help="run a command as the driver of a job",
        description=(
            "Run CMD as the driver of a job. Outside MPI this launches the job's "
            "ranks itself (srun inside a Slurm allocation, mpiexec elsewhere); "
            "under mpiexec or srun every rank takes its role from its rank: rank 0 "
            "runs CMD, every other rank is a backend."
        ),
    )
    run.add_argument(
        "--backends",
        metavar="B",
        help="number of backends (ranks = B + 1); default: DATACLAY_HPC_BACKENDS "
        "or 2 outside MPI, the world size - 1 under MPI",
    )
    run.add_argument(
        "--storage",
        metavar="DIR",
        help="folder of the job's store (one HDF5 file per backend); default: "
        "DATACLAY_HPC_STORAGE or ./dataclay-hpc-store",
    )
    run.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING (default; or DATACLAY_HPC_LOG_LEVEL)",
    )
    run.add_argument("--job-dir", help=argparse.SUPPRESS)
    run.add_argument("--watch-pid", type=int, help=argparse.SUPPRESS)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD ...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        backends = None if args.backends is None else check_backends(args.backends)
        options = JobOptions(
            command=command,
            backends=backends,
            storage=args.storage,
            job_dir=args.job_dir,
            watch_pid=args.watch_pid,
            log_level=args.log_level,
        )
        if under_mpi_launcher():
            return run_rank(options)
        if not command and args.job_dir is None:
            parser.error("run needs a command: dataclay-hpc run -- python app.py")
        return launch(options)
    except JobError as exc:
        print(f"dataclay-hpc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
