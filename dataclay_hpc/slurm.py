"""Slurm batch scripts that run one dataclay-hpc job.

``render_job_script`` writes the text of an ``sbatch`` script whose job runs a
command as the driver of a dataclay-hpc job. It emits only the directives the
caller asked for, shell-quotes every value and explains each line with a comment
in the script itself, so the script can be read, edited and submitted by hand.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from .exceptions import JobError

__all__ = ["render_job_script", "slurm_time"]

# Slurm keeps the delay of --signal in a 16-bit field
MAX_SIGNAL_WARNING_S = 65535


def slurm_time(minutes: int) -> str:
    """Return a time limit in minutes as Slurm writes it, ``[D-]HH:MM:00``.

    Args:
        minutes: The time limit, at least 1 minute.

    Returns:
        ``"00:30:00"`` for 30, ``"1-02:00:00"`` for 1560.

    Raises:
        JobError: ``minutes`` is not a whole number of at least 1.
    """
    _check_count("time_limit_min", minutes, "time_limit_min=30 for half an hour")
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    clock = f"{hours:02d}:{mins:02d}:00"
    return f"{days}-{clock}" if days else clock


def render_job_script(
    command: Sequence[str],
    *,
    job_name: str = "dataclay-hpc",
    nodes: int | None = None,
    ntasks_per_node: int | None = None,
    ntasks: int | None = None,
    time_limit_min: int | None = None,
    backends: int | None = None,
    storage: str | None = None,
    interface: str | None = None,
    signal_warning_s: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    output: str | None = None,
    extra_sbatch: Sequence[str] = (),
    python: str = sys.executable,
) -> str:
    """Return an sbatch script that runs ``command`` as the driver of a job.

    The job has one rank per Slurm task: the coordinator and the backends. When
    only the backends are given, the script asks for ``backends + 1`` tasks;
    when only the tasks are known (``ntasks``, ``nodes`` and/or
    ``ntasks_per_node``), every task but one becomes a backend. Every other
    directive appears only when its argument is set.

    Args:
        command: The driver command and its arguments, e.g.
            ``["python", "app.py"]``.
        job_name: Name of the job in ``squeue`` (``--job-name``).
        nodes: Number of nodes (``--nodes``).
        ntasks_per_node: Tasks, hence ranks, per node (``--ntasks-per-node``).
        ntasks: Tasks in all (``--ntasks``), at least ``backends + 1``.
        time_limit_min: Wall-clock limit in minutes (``--time``).
        backends: Number of backends; the job needs ``backends + 1`` tasks.
        storage: Folder of the job's store; exported as
            ``DATACLAY_HPC_STORAGE`` and passed to ``dataclay-hpc run``.
        interface: Network interface every rank listens on, e.g. ``ib0``;
            exported as ``DATACLAY_HPC_INTERFACE``.
        signal_warning_s: Seconds before the time limit at which Slurm sends
            SIGTERM to every rank and to the driver (``--signal=TERM@N``): the
            coordinator stops the backends in order, and the job ends with the
            driver's exit code (143 unless the driver handles SIGTERM).
        partition: Partition (queue) to submit to (``--partition``).
        account: Account charged for the job (``--account``).
        output: File of the job's stdout and stderr (``--output``); ``%j``
            stands for the job id.
        extra_sbatch: More sbatch options, each one whole option such as
            ``"--mem=8G"`` or ``"--exclusive"``, each shell-quoted whole.
        python: Python interpreter with dataclay_hpc installed, on every node.

    Returns:
        The script, starting with ``#!/bin/bash``.

    Raises:
        JobError: An argument has a value Slurm or dataclay-hpc cannot use; the
            message names the argument, its value and what to pass instead.
    """
    command = _check_command(command)
    for name, value, example in (
        ("nodes", nodes, "nodes=2"),
        ("ntasks_per_node", ntasks_per_node, "ntasks_per_node=4"),
        ("ntasks", ntasks, "ntasks=4"),
        ("backends", backends, "backends=3"),
    ):
        if value is not None:
            _check_count(name, value, example)
    if time_limit_min is not None:
        slurm_time(time_limit_min)
    if signal_warning_s is not None:
        _check_signal_warning(signal_warning_s, time_limit_min)
    for name, text in (
        ("job_name", job_name),
        ("storage", storage),
        ("interface", interface),
        ("partition", partition),
        ("account", account),
        ("output", output),
        ("python", python),
    ):
        if text is not None:
            _check_text(name, text)
    extra = [_check_extra(option) for option in extra_sbatch]
    backends, tasks_needed = _ranks(backends, nodes, ntasks_per_node, ntasks)

    lines = [
        "#!/bin/bash",
        "# Batch script of a dataclay-hpc job: submit it with `sbatch FILE`.",
        "# Every task is one rank: rank 0 runs the driver, the others are backends.",
    ]
    directives: list[tuple[str, str, object]] = [
        ("name of the job in squeue and sacct", "--job-name", job_name),
        ("nodes of the job", "--nodes", nodes),
        ("tasks (ranks) on each node", "--ntasks-per-node", ntasks_per_node),
        ("tasks (ranks) in all: backends + 1", "--ntasks", ntasks or tasks_needed),
        (
            "wall-clock limit, [days-]hours:minutes:seconds",
            "--time",
            None if time_limit_min is None else slurm_time(time_limit_min),
        ),
        (
            f"SIGTERM to every rank and the driver {signal_warning_s} s before the "
            "time limit:\n# the backends stop in order instead of being killed. "
            "Not to this script\n# (B:): srun would answer it by killing every rank",
            "--signal",
            None if signal_warning_s is None else f"TERM@{signal_warning_s}",
        ),
        ("partition (queue) of the job", "--partition", partition),
        ("account charged for the job", "--account", account),
        ("file of the job's stdout and stderr (%j: job id)", "--output", output),
    ]
    for comment, flag, setting in directives:
        if setting is not None:
            lines += [f"# {comment}", f"#SBATCH {flag}={shlex.quote(str(setting))}"]
    for option in extra:
        lines += ["# asked for by the caller", f"#SBATCH {shlex.quote(option)}"]

    lines += ["", "# stop at the first failing command", "set -euo pipefail"]
    if interface is not None:
        lines += [
            "# network interface whose IPv4 address every rank listens on",
            f"export DATACLAY_HPC_INTERFACE={shlex.quote(interface)}",
        ]
    if storage is not None:
        lines += [
            "# folder of the store, one HDF5 file per backend",
            f"export DATACLAY_HPC_STORAGE={shlex.quote(storage)}",
        ]
    run = [shlex.quote(python), "-m", "dataclay_hpc", "run"]
    if backends is not None:
        run += ["--backends", str(backends)]
    if storage is not None:
        run += ["--storage", '"$DATACLAY_HPC_STORAGE"']
    run += ["--", *(shlex.quote(part) for part in command)]
    lines += [
        "# start the ranks with srun and run the driver; the job's exit code is the "
        "driver's",
        " ".join(run),
    ]
    return "\n".join(lines) + "\n"


def _check_command(command: Sequence[str]) -> list[str]:
    if isinstance(command, str) or not command:
        raise JobError(
            f"command must be a non-empty list of strings; got {command!r}: pass "
            "for example ['python', 'app.py']"
        )
    parts = list(command)
    for part in parts:
        if not isinstance(part, str):
            raise JobError(
                f"command must hold strings only; got {part!r} in {parts!r}: pass "
                f"str({part!r})"
            )
    return parts


def _check_count(name: str, value: object, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JobError(
            f"{name} must be a whole number of at least 1; got {value!r}: pass for "
            f"example {example}, or leave it out"
        )


def _check_signal_warning(seconds: object, time_limit_min: int | None) -> None:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int)
        or not 1 <= seconds <= MAX_SIGNAL_WARNING_S
    ):
        raise JobError(
            f"signal_warning_s must be a whole number of seconds from 1 to "
            f"{MAX_SIGNAL_WARNING_S}; got {seconds!r}: pass for example "
            "signal_warning_s=120"
        )
    if time_limit_min is not None and seconds >= time_limit_min * 60:
        raise JobError(
            f"signal_warning_s must be shorter than the time limit "
            f"({time_limit_min * 60} s); got {seconds}: pass a smaller "
            "signal_warning_s or a longer time_limit_min"
        )


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or "\n" in value or "\0" in value:
        raise JobError(
            f"{name} must be a non-empty string on one line; got {value!r}: pass "
            f"the {name} without line breaks, or leave it out"
        )


def _check_extra(option: object) -> str:
    if (
        not isinstance(option, str)
        or not option.startswith("-")
        or "\n" in option
        or "\0" in option
    ):
        raise JobError(
            f"extra_sbatch entries must be whole sbatch options on one line; got "
            f"{option!r}: pass for example extra_sbatch=['--mem=8G']"
        )
    return option


def _ranks(
    backends: int | None,
    nodes: int | None,
    ntasks_per_node: int | None,
    ntasks: int | None,
) -> tuple[int | None, int | None]:
    """Return (backends, tasks to ask for) from what the caller set.

    Slurm gives one task per node unless told otherwise, so the tasks of the
    job are known whenever one of ``ntasks``, ``nodes`` or ``ntasks_per_node``
    is set.
    """
    if ntasks is not None:
        tasks: int | None = ntasks
    elif ntasks_per_node is not None:
        tasks = (nodes or 1) * ntasks_per_node
    else:
        tasks = nodes

    if tasks is None:
        # only the backends say how many tasks the job needs
        return backends, None if backends is None else backends + 1
    if backends is None:
        if tasks < 2:
            raise JobError(
                f"a job needs at least 2 tasks (1 coordinator + 1 backend); the "
                f"options give {tasks}: pass ntasks=2 or more, or backends=1"
            )
        return tasks - 1, None
    if backends + 1 > tasks:
        raise JobError(
            f"backends={backends} needs {backends + 1} tasks (1 coordinator + "
            f"{backends} backends) but the options give {tasks}: pass "
            f"ntasks={backends + 1}, or fewer backends"
        )
    return backends, None
