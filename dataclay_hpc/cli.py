"""The ``dataclay-hpc`` command line.

``dataclay-hpc run [--backends B] [--storage DIR] [--] CMD ...`` runs CMD as the
driver of a job with B backends; the exit code is CMD's.

``dataclay-hpc submit [OPTIONS] -- CMD ...`` writes an sbatch script that runs
CMD as the driver of a job, submits it with ``sbatch`` and prints the job id.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from .exceptions import JobError
from .job import JobOptions, check_backends, launch, run_rank, under_mpi_launcher
from .slurm import render_job_script

__all__ = ["main"]

logger = logging.getLogger(__name__)

SBATCH_TIMEOUT_S = 60.0


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
    _add_submit(commands)
    return parser


def _add_submit(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit",
        help="submit a Slurm batch job that runs a command as the driver",
        description=(
            "Write an sbatch script that runs CMD as the driver of a job, submit "
            "it with sbatch and print the job id. Only the options given become "
            "#SBATCH directives; --dry-run prints the script instead."
        ),
    )
    count = {"type": int, "metavar": "N"}
    submit.add_argument("--nodes", **count, help="nodes of the job")
    submit.add_argument("--ntasks-per-node", **count, help="tasks (ranks) per node")
    submit.add_argument("--ntasks", **count, help="tasks (ranks) in all")
    submit.add_argument(
        "--time-min", type=int, metavar="MIN", help="wall-clock limit in minutes"
    )
    submit.add_argument(
        "--backends",
        **count,
        help="number of backends; default: every task but one",
    )
    submit.add_argument("--storage", metavar="DIR", help="folder of the store")
    submit.add_argument(
        "--interface", metavar="NAME", help="network interface of the ranks, e.g. ib0"
    )
    submit.add_argument(
        "--signal-warning-s",
        type=int,
        metavar="S",
        help="SIGTERM the job S seconds before its time limit, to end it cleanly",
    )
    submit.add_argument("--job-name", default="dataclay-hpc", help="name of the job")
    submit.add_argument("--partition", help="partition (queue) to submit to")
    submit.add_argument("--account", help="account charged for the job")
    submit.add_argument(
        "--output", metavar="FILE", help="file of the job's output (%%j: job id)"
    )
    submit.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="one more sbatch option, written with =: --sbatch-option=--mem=8G "
        "(repeatable)",
    )
    submit.add_argument(
        "--script",
        metavar="FILE",
        help="where to write the script; default: a new dataclay-hpc-*.sbatch "
        "file in the current folder",
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="print the script, submit nothing"
    )
    submit.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD ...")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.command_name == "submit":
        if not command:
            parser.error("submit needs a command: dataclay-hpc submit -- python app.py")
        try:
            return _submit(args, command)
        except JobError as exc:
            print(f"dataclay-hpc: error: {exc}", file=sys.stderr)
            return 2
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


def _submit(args: argparse.Namespace, command: list[str]) -> int:
    script = render_job_script(
        command,
        job_name=args.job_name,
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node,
        ntasks=args.ntasks,
        time_limit_min=args.time_min,
        backends=args.backends,
        storage=args.storage,
        interface=args.interface,
        signal_warning_s=args.signal_warning_s,
        partition=args.partition,
        account=args.account,
        output=args.output,
        extra_sbatch=args.sbatch_option,
    )
    if args.dry_run:
        sys.stdout.write(script)
        return 0

    path = _write_script(script, args.script)
    print(f"job script: {path}")
    job_id = submit_script(path)
    print(f"submitted job {job_id}")
    return 0


def _write_script(script: str, path: str | None) -> str:
    if path is None:
        fd, path = tempfile.mkstemp(prefix="dataclay-hpc-", suffix=".sbatch", dir=".")
        os.close(fd)
    with open(path, "w") as file:
        file.write(script)
    return os.path.abspath(path)


def submit_script(path: str, timeout_s: float = SBATCH_TIMEOUT_S) -> str:
    """Submit a batch script with ``sbatch --parsable`` and return the job id.

    Args:
        path: The script to submit.
        timeout_s: Seconds to wait for ``sbatch`` to answer.

    Returns:
        The id Slurm gave the job.

    Raises:
        JobError: ``sbatch`` is missing, timed out or failed; the message
            carries the command, its exit code, stdout and stderr.
    """
    command = ["sbatch", "--parsable", path]
    logger.debug("running: %s", command)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s
        )
    except FileNotFoundError as exc:
        raise JobError(
            f"cannot run {command}: no sbatch on PATH; submit from a login node "
            "of the cluster, or load the site's Slurm module"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise JobError(
            f"{command} did not answer within {timeout_s:.0f} s; check that the "
            "Slurm controller is up (sinfo) and try again"
        ) from exc
    logger.debug("sbatch said: %r %r", result.stdout, result.stderr)
    job_id = result.stdout.strip().split(";")[0]
    if result.returncode != 0 or not job_id:
        raise JobError(
            f"{command} failed with exit code {result.returncode}; "
            f"stdout: {result.stdout.strip()!r}; stderr: {result.stderr.strip()!r}; "
            "fix the options sbatch complains about (--dry-run prints the script)"
        )
    return job_id


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
