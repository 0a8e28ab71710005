"""Side-by-side benchmark: dataclay_hpc, dataClay 4.3.1 and an MPI ping-pong floor.

Usage: ``python benchmarks/run.py [--quick] [--big] [--rounds N] [--only NAME]
[--suite NAME] [--json OUT]``.

Sets up what is missing (dataClay venv, redis, mpi4py + mpich), then runs, one
after another in this invocation on this machine, in ``--rounds`` interleaved
rounds (hpc, dataclay, floor, hpc, dataclay, floor, ...):

- ``hpc``: the workloads with ``model_hpc`` in the current environment;
  ``Client()`` starts an embedded local job with 2 backends;
- ``dataclay``: the same workloads with ``model_dataclay`` in the dataClay venv,
  against redis + metadata service + 2 backends started before its first
  round and stopped after the last;
- ``floor``: ``pingpong.py`` under the mpich wheel's ``mpiexec -n 2``.

Two workload suites: ``basic`` (``ops.py``: attribute access, activemethod,
make_persistent, get_by_alias, a move of one object, a 100 MB array; the
floor belongs to it) and ``moves`` (``moves.py``: versioning, linked lists
made persistent and moved recursively; hpc and dataClay only; run in the
first round only). Each suite runs in its own
process; a side or suite that fails is reported as failed and the others still
run. The basic table shows, per operation, the median over rounds of each
side's time and the median (and range) of the ratios computed within each
round. Prints one table per suite and writes every round to JSON.
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
#: Joins the ends of a range in the table (an en dash).
RANGE_DASH = "\u2013"
#: Rounds of the basic suite (full, quick); each round runs every side once.
DEFAULT_ROUNDS = (3, 1)
#: Deadline for the MPI ping-pong, in seconds.
FLOOR_TIMEOUT_S = 300.0
#: Lengths of the linked lists of the moves suite.
LIST_SIZES = (100, 1_000, 100_000)
#: Deadline of one list operation of the moves suite, in seconds (default, --big).
LIST_DEADLINE_S = (120.0, 600.0)
#: Longest list made persistent node by node when one make_persistent of its
#: head fails, so that its recursive move can still be tried (default, --big).
NODE_BY_NODE_MAX = (1_000, max(LIST_SIZES))
#: Deadline of the moves suite's process beyond its list deadlines, in seconds.
MOVES_BASE_TIMEOUT_S = 300.0
#: Objects per second dataclay_hpc aims at for the largest recursive move.
HPC_MOVE_TARGET_OBJECTS_PER_S = 50_000

#: Share of all CPUs busy, just before a side, above which a warning says the
#: numbers may be noisy (another program shares the cores).
BUSY_FRACTION = 0.15
#: How long the CPU use is sampled before each side, in seconds.
BUSY_SAMPLE_S = 1.0

SIDES = ("hpc", "dataclay", "floor")
SUITES = ("basic", "moves")
#: Sides that run each suite.
SUITE_SIDES = {"basic": SIDES, "moves": ("hpc", "dataclay")}
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
    ("move_one", "move one object", "us"),
    ("make_persistent_threads", "make_persistent, 8 threads (per op)", "us"),
    ("activemethod_threads", "activemethod call, 8 threads (per op)", "us"),
    ("array_roundtrip", "100 MB array round trip", "GB/s"),
)
#: Rows of the basic suite without a floor value: the floor is one rank pair's
#: ping-pong, which says nothing about several threads sharing two cores, nor
#: about a move's four messages between three processes (``chain.py``).
NO_FLOOR = frozenset({"make_persistent_threads", "activemethod_threads", "move_one"})
#: Rows of the moves suite: (result key, row title, unit); ``s`` rows are one
#: timed call each and also show objects per second.
MOVE_OPERATIONS = (
    ("versioning", "new_version() + write + consolidate_version()", "us"),
    ("versioning_same_backend", "same with new_version(backend_id=A)", "us"),
    *(
        row
        for nodes in LIST_SIZES
        for row in (
            (f"make_persistent_list_{nodes}", f"make_persistent, {nodes:,} nodes", "s"),
            (f"recursive_move_{nodes}", f"recursive move, {nodes:,} nodes", "s"),
        )
    ),
)


@dataclass(frozen=True)
class Options:
    """What to run.

    Attributes:
        quick: fewer repeats.
        big: long deadlines and the node-by-node fallback for every list size.
        suites: the selected suites, in ``SUITES`` order.
        rounds: rounds of the basic suite (the moves suite runs in the first).
    """

    quick: bool
    big: bool
    suites: tuple[str, ...]
    rounds: int = 1

    @property
    def list_deadline_s(self) -> float:
        """Deadline of one list operation of the moves suite, in seconds."""
        return LIST_DEADLINE_S[self.big]

    @property
    def node_by_node_max(self) -> int:
        """Longest list made persistent node by node after a failed call."""
        return NODE_BY_NODE_MAX[self.big]


def run_hpc(workdir: Path, options: Options) -> dict[str, dict[str, Any]]:
    """Run the selected suites on dataclay_hpc in the current environment.

    Args:
        workdir: empty directory for this side's logs and output.
        options: what to run.

    Returns:
        Suite name to its outcome (``status``, ``report``, ``error``).
    """
    setup_env.ensure_mpi()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH_DIR), str(REPO)]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["DATACLAY_HPC_BACKENDS"] = str(BACKENDS)
    return _run_suites(
        "dataclay_hpc",
        python=sys.executable,
        model="model_hpc",
        client_args=[],
        env=env,
        workdir=workdir,
        options=options,
    )


class SharedDataClay:
    """One dataClay 4.3.1 deployment shared by every round of a run.

    Started by the first :meth:`get`, stopped by :meth:`close`. A deployment
    that failed to start is not retried: later calls raise the same error.

    Args:
        workdir: empty directory for the services' logs and storage.
    """

    def __init__(self, workdir: Path) -> None:
        """Describe the deployment; nothing starts before :meth:`get`."""
        self.workdir = workdir
        self.python: Path | None = None
        self.start_s: float | None = None
        self._deployment: DataClayDeployment | None = None
        self._error: Exception | None = None

    def get(self) -> DataClayDeployment:
        """Return the running deployment, starting it on the first call.

        Raises:
            Exception: the setup or a service failed (now or on an earlier call).
        """
        if self._error is not None:
            raise self._error
        if self._deployment is None:
            start = time.monotonic()
            try:
                self.python = setup_env.ensure_dataclay_venv(DATACLAY_VENV)
                setup_env.ensure_redis()
                self.workdir.mkdir(parents=True, exist_ok=True)
                deployment = DataClayDeployment(
                    self.python, self.workdir, BENCH_DIR, BACKENDS
                )
                deployment.__enter__()
            except Exception as exc:
                self._error = exc
                raise
            self._deployment = deployment
            self.start_s = time.monotonic() - start
        return self._deployment

    def close(self) -> None:
        """Stop the deployment, if it runs, and remove its storage."""
        if self._deployment is not None:
            deployment, self._deployment = self._deployment, None
            deployment.stop()
        for storage in self.workdir.glob("storage-*"):
            shutil.rmtree(storage, ignore_errors=True)


def run_dataclay(
    workdir: Path, options: Options, shared: SharedDataClay | None = None
) -> dict[str, dict[str, Any]]:
    """Run the selected suites on dataClay 4.3.1 started on loopback.

    Both suites run against the same deployment, one after the other.

    Args:
        workdir: empty directory for this side's logs and output.
        options: what to run.
        shared: the deployment to use (started if it is not yet up); None
            starts one in ``workdir`` for this call only and stops it after.

    Returns:
        Suite name to its outcome (``status``, ``report``, ``error``).
    """
    own = shared is None
    if shared is None:
        shared = SharedDataClay(workdir)
    try:
        deployment = shared.get()
        assert shared.python is not None
        client_args = [
            "--host", deployment.host,
            "--port", str(deployment.metadata_port),
        ]  # fmt: skip
        return _run_suites(
            "dataClay",
            python=str(shared.python),
            model="model_dataclay",
            client_args=client_args,
            env=deployment.env(),
            workdir=workdir,
            options=options,
        )
    finally:
        if own:
            shared.close()


def run_floor(workdir: Path, options: Options) -> dict[str, dict[str, Any]]:
    """Run the two-rank MPI ping-pong with the mpich wheel's ``mpiexec``.

    Args:
        workdir: empty directory for this side's log and output.
        options: what to run (only ``quick`` matters).

    Returns:
        ``{"basic": outcome}`` with the ping-pong's JSON report.
    """
    mpiexec = setup_env.ensure_mpi()
    out = workdir / "floor.json"
    argv = [
        str(mpiexec), "-n", "2",
        sys.executable, "-m", "mpi4py", str(BENCH_DIR / "pingpong.py"),
        "--out", str(out),
    ] + (["--quick"] if options.quick else [])  # fmt: skip
    proc.run(
        "MPI ping-pong",
        argv,
        env=dict(os.environ),
        cwd=workdir,
        log_path=workdir / "floor.log",
        timeout_s=FLOOR_TIMEOUT_S,
    )
    return {"basic": {"status": "ok", "report": _read_json(out)}}


RUNNERS: dict[str, Callable[[Path, Options], dict[str, dict[str, Any]]]] = {
    "hpc": run_hpc,
    "dataclay": run_dataclay,
    "floor": run_floor,
}


def value_of(side: str, report: dict[str, Any], key: str, unit: str) -> float:
    """Return one cell of the basic table: microseconds per operation, or GB/s.

    Args:
        side: ``hpc``, ``dataclay`` or ``floor``.
        report: that side's JSON report of the basic suite.
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
    """Collect the values and ratios of every operation of the basic suite.

    Ratios compare time per operation, whatever the unit: ``ratio_dataclay_hpc``
    is how many times longer dataClay takes than dataclay_hpc (above 1: hpc is
    faster), ``ratio_hpc_floor`` how many times longer dataclay_hpc takes than
    the floor.

    Args:
        sides: side name to its outcome (``suites``: suite name to ``status``
            and, when ok, ``report``).

    Returns:
        One row per operation; a missing value is None.
    """
    rows = []
    for key, title, unit in OPERATIONS:
        row: dict[str, Any] = {"operation": key, "title": title, "unit": unit}
        for side in SIDES:
            outcome = _suite(sides, side, "basic") or {}
            row[side] = (
                value_of(side, outcome["report"], key, unit)
                if outcome.get("status") == "ok"
                and not (side == "floor" and key in NO_FLOOR)
                else None
            )
        row["ratio_dataclay_hpc"] = _time_ratio(row["dataclay"], row["hpc"], unit)
        row["ratio_hpc_floor"] = _time_ratio(row["hpc"], row["floor"], unit)
        rows.append(row)
    return rows


def combine_rounds(tables: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Combine the per-round rows of the basic suite into one row per operation.

    Each side's value is the median over the rounds that measured it. Each
    ratio is the median of the ratios computed within each round (both sides
    measured in the same round), not the ratio of the medians; ``*_min`` and
    ``*_max`` give its range. ``*_rounds`` keep every round's value (None where
    a round did not measure it).

    Args:
        tables: one list of rows from :func:`build_table` per round.

    Returns:
        One row per operation, with the keys of :func:`build_table` plus the
        ranges, the per-round values and ``rounds`` (how many were combined).
    """
    rows = []
    for index, (key, title, unit) in enumerate(OPERATIONS):
        per_round = [table[index] for table in tables]
        row: dict[str, Any] = {"operation": key, "title": title, "unit": unit}
        for name in (*SIDES, "ratio_dataclay_hpc", "ratio_hpc_floor"):
            values = [entry[name] for entry in per_round]
            measured = [value for value in values if value is not None]
            row[name] = statistics.median(measured) if measured else None
            row[f"{name}_rounds"] = values
            if name.startswith("ratio_"):
                row[f"{name}_min"] = min(measured) if measured else None
                row[f"{name}_max"] = max(measured) if measured else None
        row["rounds"] = len(tables)
        rows.append(row)
    return rows


def format_table(
    rows: list[dict[str, Any]], rounds: list[dict[str, dict[str, Any]]]
) -> str:
    """Render the basic rows as a plain-text table with a note per failed side.

    Args:
        rows: from :func:`combine_rounds`.
        rounds: per round, side name to its outcome.

    Returns:
        The table.
    """
    several = len(rounds) > 1
    header = ["operation", *(SIDE_TITLES[side] for side in SIDES)]
    spread = f" (min{RANGE_DASH}max)" if several else ""
    header += [f"ratio dataClay/hpc{spread}", f"ratio hpc/floor{spread}"]
    lines = [header]
    for row in rows:
        cells = [f"{row['title']} ({'µs' if row['unit'] == 'us' else 'GB/s'})"]
        for side in SIDES:
            outcome = next(
                (
                    suite
                    for sides in rounds
                    if (suite := _suite(sides, side, "basic")) is not None
                ),
                None,
            )
            if side == "floor" and row["operation"] in NO_FLOOR:
                cells.append("-")
                continue
            cells.append(_cell(row[side], row["unit"], outcome))
        for name in ("ratio_dataclay_hpc", "ratio_hpc_floor"):
            ratio = row[name]
            cell = "-" if ratio is None else _ratio(ratio)
            if ratio is not None and several:
                low = _ratio(row[f"{name}_min"], "")
                high = _ratio(row[f"{name}_max"], "")
                cell += f" ({low}{RANGE_DASH}{high})"
            cells.append(cell)
        lines.append(cells)

    title = (
        f"basic operations, {len(rounds)} rounds: each side's median over rounds; "
        f"ratios: median (min{RANGE_DASH}max) of the ratios within each round"
        if several
        else "basic operations, 1 round"
    )
    text = [title, *_render(lines)]
    for side in SIDES:
        for number, sides in enumerate(rounds, 1):
            status = (_suite(sides, side, "basic") or {}).get("status", "not run")
            if status != "ok":
                where = f", round {number}" if several else ""
                text.append(f"{SIDE_TITLES[side]}{where}: {status}")
    return "\n".join(text)


def build_moves_table(sides: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Collect the values, statuses and ratios of the moves suite.

    For each side a row holds the value (``us`` per operation, or ``s`` of the
    one timed call), the operation's ``status`` and, for list rows, objects
    per second. ``ratio_dataclay_hpc`` compares times as in the basic table;
    when one side overran its deadline the ratio is a bound, named by
    ``ratio_bound`` (``lower``: dataClay takes at least that many times longer;
    ``upper``: at most).

    Args:
        sides: side name to its outcome.

    Returns:
        One row per operation of ``MOVE_OPERATIONS``.
    """
    rows = []
    for key, title, unit in MOVE_OPERATIONS:
        row: dict[str, Any] = {"operation": key, "title": title, "unit": unit}
        for side in SUITE_SIDES["moves"]:
            entry = _move_entry(sides, side, key)
            row[f"{side}_status"] = entry.get("status", "not run")
            row[side] = entry.get(unit) if row[f"{side}_status"] == "ok" else None
            if unit == "s":
                row[f"{side}_objects_per_s"] = entry.get("objects_per_s")
            row[f"{side}_lower_bound_s"] = entry.get("s_lower_bound")
            if "node_by_node_make_persistent_s" in entry:
                row[f"{side}_node_by_node_make_persistent_s"] = entry[
                    "node_by_node_make_persistent_s"
                ]
        row["ratio_dataclay_hpc"] = _time_ratio(row["dataclay"], row["hpc"], unit)
        row["ratio_bound"] = None
        if row["ratio_dataclay_hpc"] is None:
            if row["hpc"] and row["dataclay_lower_bound_s"]:
                row["ratio_dataclay_hpc"] = row["dataclay_lower_bound_s"] / row["hpc"]
                row["ratio_bound"] = "lower"
            elif row["dataclay"] and row["hpc_lower_bound_s"]:
                row["ratio_dataclay_hpc"] = row["dataclay"] / row["hpc_lower_bound_s"]
                row["ratio_bound"] = "upper"
        rows.append(row)
    return rows


def format_moves_table(
    rows: list[dict[str, Any]], sides: dict[str, dict[str, Any]], options: Options
) -> str:
    """Render the moves rows as a plain-text table followed by notes.

    The notes give the full status of every operation that did not succeed,
    say which recursive moves ran on a list made persistent node by node, and
    compare the 100 000-node move of dataclay_hpc with its target.

    Args:
        rows: from :func:`build_moves_table`.
        sides: side name to its outcome.
        options: what was run (for the deadline in the title).

    Returns:
        The table.
    """
    move_sides = SUITE_SIDES["moves"]
    header = ["operation", *(SIDE_TITLES[side] for side in move_sides)]
    header.append("ratio dataClay/hpc")
    lines = [header]
    notes: list[str] = []
    for row in rows:
        unit_label = "µs" if row["unit"] == "us" else "s, objects/s"
        cells = [f"{row['title']} ({unit_label})"]
        for side in move_sides:
            cells.append(_move_cell(row, side))
            status = row[f"{side}_status"]
            # "not measured" rows follow from the suite failure reported below.
            if status != "ok" and not status.startswith(("not run", "not measured")):
                notes.append(f"{SIDE_TITLES[side]}, {row['title']}: {status}")
            node_by_node_s = row.get(f"{side}_node_by_node_make_persistent_s")
            if node_by_node_s is not None:
                notes.append(
                    f"{SIDE_TITLES[side]}, {row['title']}: measured on a list "
                    f"made persistent node by node ({node_by_node_s:.1f} s), as "
                    "one make_persistent of the head failed"
                )
        ratio = row["ratio_dataclay_hpc"]
        prefix = {"lower": "> ", "upper": "< "}.get(row["ratio_bound"] or "", "")
        cells.append("-" if ratio is None else f"{prefix}{ratio:.2f}x")
        lines.append(cells)

    text = [
        "move and versioning (lists: one make_persistent of the head on backend "
        "A, then head.move(B, recursive=True); deadline "
        f"{options.list_deadline_s:.0f} s per list operation)",
        *_render(lines),
    ]
    for side in move_sides:
        outcome = _suite(sides, side, "moves")
        if outcome is None:
            text.append(f"{SIDE_TITLES[side]}: not run")
        elif outcome["status"] != "ok":
            text.append(f"{SIDE_TITLES[side]}: {outcome['status']}")
    big = f"recursive_move_{max(LIST_SIZES)}"
    for row in rows:
        if row["operation"] == big and row["hpc_objects_per_s"] is not None:
            rate = row["hpc_objects_per_s"]
            verdict = "met" if rate >= HPC_MOVE_TARGET_OBJECTS_PER_S else "NOT met"
            notes.append(
                f"dataclay_hpc target for {row['title']}: >= "
                f"{HPC_MOVE_TARGET_OBJECTS_PER_S:,} objects/s, {verdict} "
                f"({rate:,.0f}/s)"
            )
    text.extend(f"- {note}" for note in notes)
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
    """Run the selected sides and suites, print the tables, write the JSON report.

    Args:
        argv: command-line arguments without the program name.

    Returns:
        0 when every selected side ran every selected suite, 1 when a side or
        a suite's process failed (single failed operations of the moves suite
        are results, not failures), 130 when interrupted.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--big",
        action="store_true",
        help=(
            f"moves suite: {LIST_DEADLINE_S[True]:.0f} s deadline per list "
            "operation, and lists of every size made persistent node by node "
            "when one make_persistent fails (can take 20 minutes on dataClay)"
        ),
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help=(
            "interleaved rounds of the basic suite, each running every side "
            f"once (default {DEFAULT_ROUNDS[0]}, {DEFAULT_ROUNDS[1]} with "
            "--quick); the moves suite runs in the first round only"
        ),
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SIDES,
        metavar="NAME",
        help="run only this side (hpc, dataclay, floor); may be repeated",
    )
    parser.add_argument(
        "--suite",
        action="append",
        choices=SUITES,
        metavar="NAME",
        help="run only this suite (basic, moves); may be repeated",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="report file (default: results.json in the run's log directory)",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    suites = tuple(suite for suite in SUITES if suite in (args.suite or SUITES))
    rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS[args.quick]
    if "basic" not in suites and rounds > 1:
        logger.warning("the moves suite runs once; --rounds %d ignored", rounds)
        rounds = 1
    options = Options(quick=args.quick, big=args.big, suites=suites, rounds=rounds)
    selected = [
        side
        for side in SIDES
        if side in (args.only or SIDES)
        and any(side in SUITE_SIDES[suite] for suite in suites)
    ]
    for side in args.only or ():
        if side not in selected:
            logger.warning(
                "%s runs none of the selected suites (%s)",
                SIDE_TITLES[side],
                ", ".join(suites),
            )
    run_dir = _new_run_dir()
    logger.info("logs of this run: %s", run_dir)

    # Interleaved rounds: hpc, dataclay, floor, hpc, dataclay, floor, ... The
    # moves suite runs in the first round only; dataClay stays up throughout.
    shared = SharedDataClay(run_dir / "dataclay-services")
    runners = dict(RUNNERS)
    runners["dataclay"] = functools.partial(run_dataclay, shared=shared)
    rounds_run: list[dict[str, dict[str, Any]]] = []
    start = time.monotonic()
    try:
        for number in range(1, rounds + 1):
            round_suites = suites if number == 1 else ("basic",)
            round_options = dataclasses.replace(options, suites=round_suites)
            sides_of_round: dict[str, dict[str, Any]] = {}
            if rounds > 1:
                logger.info("round %d of %d", number, rounds)
            for side in selected:
                if not any(side in SUITE_SIDES[suite] for suite in round_suites):
                    continue
                workdir = (
                    run_dir / side if rounds == 1 else run_dir / f"round{number}" / side
                )
                sides_of_round[side] = _run_side(
                    side, workdir, round_options, runners[side]
                )
            rounds_run.append(sides_of_round)
    except KeyboardInterrupt:
        logger.error("interrupted; every process started was stopped")
        return 130
    finally:
        shared.close()
    total_s = time.monotonic() - start
    # ``sides`` keeps its shape: each side's outcome in the first round, where
    # every selected suite ran; every round is under ``rounds``.
    sides = rounds_run[0]

    report: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "options": asdict(options),
        "machine": machine_info(),
        "seconds": total_s,
        "dataclay_start_s": shared.start_s,
    }
    round_tables = [build_table(sides_of_round) for sides_of_round in rounds_run]
    if "basic" in suites:
        rows = combine_rounds(round_tables)
        print(format_table(rows, rounds_run))
        report["table"] = rows
    if "moves" in suites:
        move_rows = build_moves_table(sides)
        if "basic" in suites:
            print()
        print(format_moves_table(move_rows, sides, options))
        report["moves_table"] = move_rows
    report["sides"] = sides
    report["rounds"] = [
        {"round": number, "sides": sides_of_round, "table": table}
        for number, (sides_of_round, table) in enumerate(
            zip(rounds_run, round_tables, strict=True), 1
        )
    ]
    report["logs"] = str(run_dir)
    json_path = args.json or run_dir / "results.json"
    json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"JSON report: {json_path}")
    print(f"{rounds} round{'s' if rounds > 1 else ''} in {total_s:.0f} s")
    failed = [
        side
        for sides_of_round in rounds_run
        for side, outcome in sides_of_round.items()
        if outcome["status"] != "ok"
    ]
    return 1 if failed else 0


def _run_side(
    side: str,
    workdir: Path,
    options: Options,
    runner: Callable[[Path, Options], dict[str, dict[str, Any]]],
) -> dict[str, Any]:
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
        outcome["suites"] = runner(workdir, options)
    except Exception as exc:  # noqa: BLE001 - one failed side must not stop the rest
        reason = str(exc).strip() or type(exc).__name__
        logger.error("%s failed: %s", SIDE_TITLES[side], reason)
        failed = {"status": f"failed: {reason.splitlines()[0]}", "error": reason}
        outcome["suites"] = {
            suite: dict(failed)
            for suite in options.suites
            if side in SUITE_SIDES[suite]
        }
    statuses = [
        f"{suite}: {result['status']}"
        for suite, result in outcome["suites"].items()
        if result["status"] != "ok"
    ]
    outcome["status"] = f"failed: {'; '.join(statuses)}" if statuses else "ok"
    outcome["seconds"] = time.monotonic() - start
    logger.info(
        "%s done in %.1f s: %s",
        SIDE_TITLES[side],
        outcome["seconds"],
        outcome["status"],
    )
    return outcome


def _run_suites(
    name: str,
    *,
    python: str,
    model: str,
    client_args: list[str],
    env: dict[str, str],
    workdir: Path,
    options: Options,
) -> dict[str, dict[str, Any]]:
    # Each suite in its own process; one failing does not stop the next.
    outcomes: dict[str, dict[str, Any]] = {}
    for suite in options.suites:
        if suite == "basic":
            script, extra = "ops.py", []
            out = workdir / f"{model}.json"
            timeout_s = WORKLOAD_TIMEOUT_S[options.quick]
        else:
            script = "moves.py"
            extra = [
                "--deadline", str(options.list_deadline_s),
                "--node-by-node-max", str(options.node_by_node_max),
                "--sizes", ",".join(str(nodes) for nodes in LIST_SIZES),
            ]  # fmt: skip
            out = workdir / f"{model}-moves.json"
            timeout_s = MOVES_BASE_TIMEOUT_S + 4 * options.list_deadline_s
        argv = [
            python, str(BENCH_DIR / script),
            "--model", model,
            "--backends", str(BACKENDS),
            "--out", str(out),
            *client_args,
            *extra,
        ] + (["--quick"] if options.quick else [])  # fmt: skip
        logger.info("%s: %s suite", name, suite)
        try:
            proc.run(
                f"{name} {suite} workload",
                argv,
                env=env,
                cwd=workdir,
                log_path=out.with_suffix(".log"),
                timeout_s=timeout_s,
            )
            outcomes[suite] = {"status": "ok", "report": _read_json(out)}
        except Exception as exc:  # noqa: BLE001 - reported, the next suite runs
            reason = str(exc).strip() or type(exc).__name__
            logger.error("%s %s suite failed: %s", name, suite, reason)
            outcomes[suite] = {
                "status": f"failed: {reason.splitlines()[0]}",
                "error": reason,
            }
            # The moves workload rewrites its report after every operation:
            # keep what it measured before it failed.
            if suite == "moves" and out.exists():
                with contextlib.suppress(OSError, ValueError):
                    outcomes[suite]["report"] = _read_json(out)
    return outcomes


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


def _ratio(value: float, suffix: str = "x") -> str:
    # Two decimals below 10, one above: enough for numbers this noisy.
    return f"{value:.2f}{suffix}" if value < 10 else f"{value:.1f}{suffix}"


def _time_ratio(
    numerator: float | None, denominator: float | None, unit: str
) -> float | None:
    if numerator is None or denominator is None:
        return None
    # A GB/s value is inverse to time per operation.
    if unit == "GB/s":
        return denominator / numerator
    return numerator / denominator


def _suite(
    sides: dict[str, dict[str, Any]], side: str, suite: str
) -> dict[str, Any] | None:
    # The outcome of one suite on one side; None when it was not run.
    suites: dict[str, dict[str, Any]] = sides.get(side, {}).get("suites", {})
    return suites.get(suite)


def _move_entry(
    sides: dict[str, dict[str, Any]], side: str, key: str
) -> dict[str, Any]:
    outcome = _suite(sides, side, "moves")
    if outcome is None:
        return {"status": "not run"}
    entry = outcome.get("report", {}).get("results", {}).get(key)
    if entry is not None:
        return dict(entry)
    if outcome["status"] != "ok":
        return {"status": f"not measured (the workload {outcome['status']})"}
    return {"status": "not measured"}


def _move_cell(row: dict[str, Any], side: str) -> str:
    status = row[f"{side}_status"]
    value = row[side]
    if status == "ok" and value is not None:
        if row["unit"] == "us":
            return f"{value:.1f}"
        return f"{value:.3f} s, {row[f'{side}_objects_per_s']:,.0f}/s"
    if status.startswith("timeout"):
        return status
    if status.startswith("failed: "):
        # The exception type only; the notes under the table give the message.
        reason = status.removeprefix("failed: ")
        head = reason.split(":", 1)[0]
        return f"failed: {head}" if head.isidentifier() else "failed"
    return status.split(":", 1)[0].split(" (", 1)[0]


def _render(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[col]) for line in lines) for col in range(len(lines[0]))]
    text = [
        " | ".join(
            cell.ljust(width) if col == 0 else cell.rjust(width)
            for col, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "-+-".join("-" * width for width in widths))
    return text


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so every finally block stops its processes;
    # a second SIGTERM must not cut that clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
