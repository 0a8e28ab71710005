"""Side-by-side benchmark: dataclay_hpc, dataClay 4.3.1 and an MPI ping-pong floor.

Usage: ``python benchmarks/run.py [--quick] [--only NAME] [--json OUT]``.

Sets up what is missing (dataClay venv, redis, mpi4py + mpich), then runs, one
after another in this invocation on this machine:

- ``hpc``: the workload of ``ops.py`` with ``model_hpc`` in the current
  environment; ``Client()`` starts an embedded local job with 2 backends;
- ``dataclay``: the same workload with ``model_dataclay`` in the dataClay venv,
  against redis + metadata service + 2 backends started here and stopped after;
- ``floor``: ``pingpong.py`` under the mpich wheel's ``mpiexec -n 2``.

A side that fails is reported as failed and the others still run. Prints a
table and writes every number to JSON.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import proc
import setup_env
from dataclay_deploy import DataClayDeployment

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
STATE_DIR = REPO / ".bench"
DATACLAY_VENV = STATE_DIR / "dataclay-venv"
RUNS_DIR = STATE_DIR / "runs"
#: Run directories (logs) kept under ``.bench/runs``.
RUNS_KEPT = 5
#: Backends in each library's deployment.
BACKENDS = 2
#: Deadline for one workload run, in seconds (full, quick).
WORKLOAD_TIMEOUT_S = (900.0, 300.0)
#: Deadline for the MPI ping-pong, in seconds.
FLOOR_TIMEOUT_S = 300.0

#: Share of all CPUs busy, just before a side, above which a warning says the
#: numbers may be noisy (another program shares the cores).
BUSY_FRACTION = 0.15
#: How long the CPU use is sampled before each side, in seconds.
BUSY_SAMPLE_S = 1.0

SIDES = ("hpc", "dataclay", "floor")
SIDE_TITLES = {
    "hpc": "dataclay_hpc",
    "dataclay": "dataClay 4.3.1",
    "floor": "plain floor",
}
#: (result key, row title, unit); a unit of GB/s means higher is better.
OPERATIONS = (
    ("attr_read", "attribute read", "us"),
    ("attr_write", "attribute write", "us"),
    ("activemethod", "activemethod call", "us"),
    ("make_persistent", "make_persistent", "us"),
    ("get_by_alias", "get_by_alias", "us"),
    ("array_roundtrip", "100 MB array round trip", "GB/s"),
)


def run_hpc(workdir: Path, quick: bool) -> dict[str, Any]:
    """Run the workload on dataclay_hpc in the current environment.

    Args:
        workdir: empty directory for this side's logs and output.
        quick: use the short plan.

    Returns:
        The workload's JSON report.
    """
    setup_env.ensure_mpi()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH_DIR), str(REPO)]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["DATACLAY_HPC_BACKENDS"] = str(BACKENDS)
    return _run_workload(
        "dataclay_hpc workload",
        python=sys.executable,
        model="model_hpc",
        client_args=[],
        env=env,
        workdir=workdir,
        quick=quick,
    )


def run_dataclay(workdir: Path, quick: bool) -> dict[str, Any]:
    """Start dataClay 4.3.1 on loopback, run the workload, stop dataClay.

    Args:
        workdir: empty directory for this side's logs, storage and output.
        quick: use the short plan.

    Returns:
        The workload's JSON report.
    """
    python = setup_env.ensure_dataclay_venv(DATACLAY_VENV)
    setup_env.ensure_redis()

    try:
        with DataClayDeployment(python, workdir, BENCH_DIR, BACKENDS) as deployment:
            client_args = [
                "--host", deployment.host,
                "--port", str(deployment.metadata_port),
            ]  # fmt: skip
            return _run_workload(
                "dataClay workload",
                python=str(python),
                model="model_dataclay",
                client_args=client_args,
                env=deployment.env(),
                workdir=workdir,
                quick=quick,
            )
    finally:
        for storage in workdir.glob("storage-*"):
            shutil.rmtree(storage, ignore_errors=True)


def run_floor(workdir: Path, quick: bool) -> dict[str, Any]:
    """Run the two-rank MPI ping-pong with the mpich wheel's ``mpiexec``.

    Args:
        workdir: empty directory for this side's log and output.
        quick: use fewer repeats.

    Returns:
        The ping-pong's JSON report.
    """
    mpiexec = setup_env.ensure_mpi()
    out = workdir / "floor.json"
    argv = [
        str(mpiexec), "-n", "2",
        sys.executable, "-m", "mpi4py", str(BENCH_DIR / "pingpong.py"),
        "--out", str(out),
    ] + (["--quick"] if quick else [])  # fmt: skip
    proc.run(
        "MPI ping-pong",
        argv,
        env=dict(os.environ),
        cwd=workdir,
        log_path=workdir / "floor.log",
        timeout_s=FLOOR_TIMEOUT_S,
    )
    return _read_json(out)


RUNNERS: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    "hpc": run_hpc,
    "dataclay": run_dataclay,
    "floor": run_floor,
}


def value_of(side: str, report: dict[str, Any], key: str, unit: str) -> float:
    """Return one table cell: microseconds per operation, or GB/s.

    Args:
        side: ``hpc``, ``dataclay`` or ``floor``.
        report: that side's JSON report.
        key: the operation's result key.
        unit: ``us`` or ``GB/s``.

    Returns:
        The value; for the floor, the small-dict round trip for every
        latency row and the raw-buffer array round trip for the array row.
    """
    if side == "floor":
        entry = report["array_buffer"] if unit == "GB/s" else report["small_dict"]
    else:
        entry = report["results"][key]
    return float(entry["gbps"] if unit == "GB/s" else entry["us"])


def build_table(sides: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Collect the values and ratios of every operation.

    Ratios compare time per operation, whatever the unit: ``ratio_dataclay_hpc``
    is how many times longer dataClay takes than dataclay_hpc (above 1: hpc is
    faster), ``ratio_hpc_floor`` how many times longer dataclay_hpc takes than
    the floor.

    Args:
        sides: side name to its outcome (``status`` and, when ok, ``report``).

    Returns:
        One row per operation; a missing value is None.
    """
    rows = []
    for key, title, unit in OPERATIONS:
        row: dict[str, Any] = {"operation": key, "title": title, "unit": unit}
        for side in SIDES:
            outcome = sides.get(side, {})
            row[side] = (
                value_of(side, outcome["report"], key, unit)
                if outcome.get("status") == "ok"
                else None
            )
        row["ratio_dataclay_hpc"] = _time_ratio(row["dataclay"], row["hpc"], unit)
        row["ratio_hpc_floor"] = _time_ratio(row["hpc"], row["floor"], unit)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], sides: dict[str, dict[str, Any]]) -> str:
    """Render the rows as a plain-text table with a note per failed side.

    Args:
        rows: from :func:`build_table`.
        sides: side name to its outcome.

    Returns:
        The table.
    """
    header = ["operation", *(SIDE_TITLES[side] for side in SIDES)]
    header += ["ratio dataClay/hpc", "ratio hpc/floor"]
    lines = [header]
    for row in rows:
        cells = [f"{row['title']} ({'µs' if row['unit'] == 'us' else 'GB/s'})"]
        for side in SIDES:
            cells.append(_cell(row[side], row["unit"], sides.get(side)))
        for ratio in (row["ratio_dataclay_hpc"], row["ratio_hpc_floor"]):
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
        lines.append(cells)

    widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
    text = [
        " | ".join(
            cell.ljust(width) if col == 0 else cell.rjust(width)
            for col, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "-+-".join("-" * width for width in widths))
    for side in SIDES:
        status = sides.get(side, {}).get("status", "not run")
        if status != "ok":
            text.append(f"{SIDE_TITLES[side]}: {status}")
    return "\n".join(text)


def cpu_busy_fraction(sample_s: float = BUSY_SAMPLE_S) -> float:
    """Return the share of all CPUs' time spent busy over the next ``sample_s``.

    Args:
        sample_s: length of the sample, in seconds.

    Returns:
        A value between 0 (idle) and 1 (every core busy); 0 where
        ``/proc/stat`` cannot be read.
    """
    try:
        before = _cpu_times()
        time.sleep(sample_s)
        after = _cpu_times()
    except (OSError, ValueError):
        return 0.0
    total = sum(after) - sum(before)
    idle = (after[3] + after[4]) - (before[3] + before[4])
    return max(0.0, 1.0 - idle / total) if total > 0 else 0.0


def machine_info() -> dict[str, Any]:
    """Describe the machine the numbers come from.

    Returns:
        CPU count, platform, Python version and host name.
    """
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the selected sides, print the table and write the JSON report.

    Args:
        argv: command-line arguments without the program name.

    Returns:
        0 when every selected side succeeded, 1 when one failed, 130 when
        interrupted.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (~30 s)")
    parser.add_argument(
        "--only",
        action="append",
        choices=SIDES,
        metavar="NAME",
        help="run only this side (hpc, dataclay, floor); may be repeated",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="report file (default: results.json in the run's log directory)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    selected = args.only or list(SIDES)
    run_dir = _new_run_dir()
    logger.info("logs of this run: %s", run_dir)

    sides: dict[str, dict[str, Any]] = {}
    try:
        for side in SIDES:
            if side in selected:
                sides[side] = _run_side(side, run_dir / side, args.quick)
    except KeyboardInterrupt:
        logger.error("interrupted; every process started was stopped")
        return 130

    rows = build_table(sides)
    print(format_table(rows, sides))
    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine_info(),
        "table": rows,
        "sides": sides,
        "logs": str(run_dir),
    }
    json_path = args.json or run_dir / "results.json"
    json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"JSON report: {json_path}")
    failed = [side for side in selected if sides[side]["status"] != "ok"]
    return 1 if failed else 0


def _run_side(side: str, workdir: Path, quick: bool) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    busy_before = cpu_busy_fraction()
    if busy_before > BUSY_FRACTION:
        logger.warning(
            "the CPUs were %.0f %% busy just before %s: other processes share "
            "the cores, expect noisy numbers",
            busy_before * 100,
            SIDE_TITLES[side],
        )
    logger.info("running %s", SIDE_TITLES[side])
    start = time.monotonic()
    outcome: dict[str, Any] = {"cpu_busy_before": busy_before}
    try:
        outcome["report"] = RUNNERS[side](workdir, quick)
    except Exception as exc:  # noqa: BLE001 - one failed side must not stop the rest
        reason = str(exc).strip() or type(exc).__name__
        logger.error("%s failed: %s", SIDE_TITLES[side], reason)
        outcome["status"] = f"failed: {reason.splitlines()[0]}"
        outcome["error"] = reason
    else:
        outcome["status"] = "ok"
        logger.info("%s done in %.1f s", SIDE_TITLES[side], time.monotonic() - start)
    outcome["seconds"] = time.monotonic() - start
    return outcome


def _run_workload(
    name: str,
    *,
    python: str,
    model: str,
    client_args: list[str],
    env: dict[str, str],
    workdir: Path,
    quick: bool,
) -> dict[str, Any]:
    out = workdir / f"{model}.json"
    argv = [
        python, str(BENCH_DIR / "ops.py"),
        "--model", model,
        "--backends", str(BACKENDS),
        "--out", str(out),
        *client_args,
    ] + (["--quick"] if quick else [])  # fmt: skip
    proc.run(
        name,
        argv,
        env=env,
        cwd=workdir,
        log_path=workdir / f"{model}.log",
        timeout_s=WORKLOAD_TIMEOUT_S[quick],
    )
    return _read_json(out)


def _cpu_times() -> list[int]:
    # First line of /proc/stat: user nice system idle iowait irq softirq steal ...
    with open("/proc/stat", encoding="ascii") as stat:
        fields = stat.readline().split()
    return [int(value) for value in fields[1:9]]


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as source:
        data: dict[str, Any] = json.load(source)
    return data


def _new_run_dir() -> Path:
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    old_runs = sorted(path for path in RUNS_DIR.iterdir() if path.is_dir())
    for old in old_runs[: max(0, len(old_runs) - RUNS_KEPT + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = RUNS_DIR / f"{stamp}-{os.getpid()}"
    run_dir.mkdir()
    return run_dir


def _cell(value: float | None, unit: str, outcome: dict[str, Any] | None) -> str:
    if value is not None:
        return f"{value:.3f}" if unit == "GB/s" else f"{value:.1f}"
    if outcome is None:
        return "not run"
    return "failed"


def _time_ratio(
    numerator: float | None, denominator: float | None, unit: str
) -> float | None:
    if numerator is None or denominator is None:
        return None
    # A GB/s value is inverse to time per operation.
    if unit == "GB/s":
        return denominator / numerator
    return numerator / denominator


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so every finally block stops its processes;
    # a second SIGTERM must not cut that clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
