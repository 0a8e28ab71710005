"""The "move and versioning" workload, written once and run against either library.

Like ``ops.py``, the model module named on the command line (``model_dataclay``
or ``model_hpc``) supplies ``Client``, ``Employee`` and ``Node``, and both
libraries run exactly the same calls:

- ``versioning``: ``v = employee.new_version(); v.salary = x;
  v.consolidate_version()`` as one operation (time per operation), the
  version placed by the library; ``versioning_same_backend`` the same with
  ``new_version(backend_id=A)``, the backend of the original;
- for each list size N: ``make_persistent_list_N``, one ``make_persistent`` of
  the head of a volatile linked list of N ``Node`` objects on backend A, and
  ``recursive_move_N``, ``head.move(B, recursive=True)`` of that list, checked
  afterwards by reading the last node and comparing its
  ``_dc_meta.master_backend_id`` with B.

Every operation is measured on its own: one that fails is recorded as
``failed: <reason>`` and the workload goes on. When ``make_persistent`` of a
list fails, a list of up to ``--node-by-node-max`` nodes is made persistent
node by node instead (last node first, so every call stores a single object)
and the recursive move is still measured on it; the move's entry says so.

Each list operation runs under a deadline (``--deadline``). When one exceeds
it, the entry reads ``timeout > N s``, the remaining operations are recorded as
skipped, the report is written and the process exits at once: the operation
still runs inside the library and cannot be cancelled. The report is rewritten
after every operation, so a killed run still leaves what it measured.

Run directly only for debugging; ``run.py`` starts this script in the right
environment for each library.
"""

import argparse
import contextlib
import importlib
import itertools
import json
import logging
import os
import platform
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ops import DISTRIBUTIONS, Plan, library_version, time_per_op, wait_for_backends

logger = logging.getLogger(__name__)

#: Lengths of the linked lists that are made persistent and moved.
LIST_SIZES = (100, 1_000, 100_000)
#: Counts for the per-operation rows (move of one object, versioning).
FULL_PLAN = Plan(ops_per_repeat=50, repeats=7, warmup_ops=10, array_repeats=0)
QUICK_PLAN = Plan(ops_per_repeat=20, repeats=3, warmup_ops=5, array_repeats=0)
#: Default deadline for one list operation, in seconds.
DEFAULT_DEADLINE_S = 120.0
#: Default largest list made persistent node by node when one call fails.
DEFAULT_NODE_BY_NODE_MAX = 1_000
#: How long to wait for the expected number of backends, in seconds.
BACKEND_WAIT_S = 60.0
#: Characters of an error message kept in a ``failed: ...`` status.
STATUS_CHARS = 300


class Report:
    """The workload's JSON report, rewritten on disk after every change.

    Args:
        path: file to write.
        header: fields describing the run (library, plan, ...).
    """

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = dict(header)
        self.data["results"] = {}
        self.save()

    def record(self, key: str, entry: dict[str, Any]) -> None:
        """Store the entry of one operation and write the report."""
        self.data["results"][key] = entry
        logger.info("%s: %s", key, entry.get("status"))
        self.save()

    def save(self) -> None:
        """Write the report atomically (a reader never sees half a file)."""
        partial = self.path.with_name(self.path.name + ".part")
        partial.write_text(json.dumps(self.data, indent=2), encoding="utf-8")
        os.replace(partial, self.path)


def failure(exc: BaseException) -> dict[str, Any]:
    """Describe a failed operation.

    Args:
        exc: what the operation raised.

    Returns:
        ``status`` (``failed: <type>: <first line of the message>``) and
        ``error`` (the full message and the end of the traceback).
    """
    message = str(exc).strip()
    first_line = message.splitlines()[0] if message else ""
    reason = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    if len(reason) > STATUS_CHARS:
        reason = reason[: STATUS_CHARS - 3] + "..."
    tail = "".join(traceback.format_exception(exc)[-6:])
    return {"status": f"failed: {reason}", "error": tail}


class Watchdog:
    """Ends the process when an operation overruns its deadline.

    The operation runs on the calling (main) thread, exactly like every other
    call of the workload; a timer thread waits beside it. When the deadline
    passes first, the timer calls ``on_timeout`` (which records the timeout
    in the report) and exits the process: the library call cannot be
    cancelled, and the client it blocks could not even be stopped.
    """

    def __init__(self, report: Report) -> None:
        self.report = report
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def deadline(
        self, deadline_s: float, on_timeout: Callable[[], None]
    ) -> Iterator[None]:
        """Run the body of the ``with`` block under a deadline.

        Args:
            deadline_s: the deadline, in seconds.
            on_timeout: records the timeout; called from the timer thread.
        """
        finished = threading.Event()

        def fire() -> None:
            with self._lock:
                if finished.is_set():
                    return
                try:
                    on_timeout()
                    self.report.data["complete"] = True
                    self.report.save()
                finally:
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)

        timer = threading.Timer(deadline_s, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            with self._lock:
                finished.set()
            timer.cancel()


def bench_versioning(
    model: ModuleType, backend_a: object, plan: Plan, version_backend: object = None
) -> dict[str, Any]:
    """Time ``new_version`` + one attribute write + ``consolidate_version``.

    Args:
        model: the model module of the library under test.
        backend_a: backend the original object is stored on.
        plan: the counts to use.
        version_backend: ``backend_id`` passed to ``new_version``; with None
            the library places the version (dataClay 4.3.1: a random backend;
            dataclay_hpc: the object's backend).

    Returns:
        As :func:`ops.time_per_op`, plus ``status``.

    Raises:
        AssertionError: the original object does not show the consolidated value.
    """
    employee = model.Employee("versioned", 0.0)
    employee.make_persistent(backend_id=backend_a)
    counter = itertools.count(1)
    last = [0.0]

    def version_once() -> None:
        salary = float(next(counter))
        if version_backend is None:
            version = employee.new_version()
        else:
            version = employee.new_version(backend_id=version_backend)
        version.salary = salary
        version.consolidate_version()
        last[0] = salary

    entry = time_per_op(version_once, plan)
    if employee.salary != last[0]:
        raise AssertionError(
            f"after consolidate_version the object reads salary={employee.salary!r}, "
            f"expected {last[0]!r}"
        )
    return {"status": "ok", **entry}


def build_list(model: ModuleType, nodes: int) -> list[Any]:
    """Build a volatile linked list without recursion.

    Args:
        model: the model module of the library under test.
        nodes: its length.

    Returns:
        Every node, last node first: element ``-1`` is the head, element 0
        the last node; node ``i`` of the list has payload ``i``.
    """
    built: list[Any] = []
    node = None
    for payload in range(nodes - 1, -1, -1):
        node = model.Node(payload, node)
        built.append(node)
    return built


@dataclass(frozen=True)
class ListLimits:
    """Limits of the list operations.

    Attributes:
        deadline_s: deadline of each call (and of the check after a move).
        node_by_node_max: longest list made persistent node by node when one
            ``make_persistent`` of the head fails.
        watchdog: enforces the deadlines.
    """

    deadline_s: float
    node_by_node_max: int
    watchdog: Watchdog


def bench_list(
    model: ModuleType,
    nodes: int,
    backend_a: object,
    backend_b: object,
    limits: ListLimits,
    on_timeout: Callable[[dict[str, Any], dict[str, Any]], None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Make a list of ``nodes`` nodes persistent on A, then move it to B.

    Args:
        model: the model module of the library under test.
        nodes: length of the list.
        backend_a: where the list is made persistent.
        backend_b: where it is moved.
        limits: deadline of each call, node-by-node fallback limit, watchdog.
        on_timeout: records both entries and ends the process when a call
            overruns its deadline (called from the watchdog's thread).

    Returns:
        The entries of ``make_persistent_list_N`` and ``recursive_move_N``.
    """
    start = time.perf_counter()
    built = build_list(model, nodes)
    build_s = time.perf_counter() - start
    head, tail = built[-1], built[0]
    persist: dict[str, Any] = {"nodes": nodes, "build_s": build_s}
    move: dict[str, Any] = {"nodes": nodes}
    deadline_s = limits.deadline_s

    def overrun(entry: dict[str, Any], status: str | None = None) -> Callable[[], None]:
        def record() -> None:
            entry.update(_timeout(deadline_s))
            if status is not None:
                entry["status"] = status
            if entry is persist:
                move["status"] = "skipped: make_persistent of the list timed out"
            on_timeout(persist, move)

        return record

    try:
        with limits.watchdog.deadline(deadline_s, overrun(persist)):
            start = time.perf_counter()
            head.make_persistent(backend_id=backend_a)
            seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - recorded, the workload goes on
        persist.update(failure(exc))
    else:
        persist.update({"status": "ok", "s": seconds, "objects_per_s": nodes / seconds})

    if persist["status"] != "ok":
        if nodes > limits.node_by_node_max:
            move["status"] = (
                "skipped: make_persistent of the list failed (the node-by-node "
                f"fallback is limited to {limits.node_by_node_max} nodes)"
            )
            return persist, move
        note = f"skipped: node-by-node make_persistent timeout > {deadline_s:.0f} s"
        try:
            with limits.watchdog.deadline(deadline_s, overrun(move, note)):
                start = time.perf_counter()
                _persist_node_by_node(built, backend_a)
                seconds = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - recorded, the workload goes on
            move.update(failure(exc))
            move["status"] = f"skipped: node-by-node make_persistent {move['status']}"
            return persist, move
        move["node_by_node_make_persistent_s"] = seconds

    try:
        with limits.watchdog.deadline(deadline_s, overrun(move)):
            start = time.perf_counter()
            head.move(backend_b, recursive=True)
            seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - recorded, the workload goes on
        move.update(failure(exc))
        return persist, move
    move.update({"s": seconds, "objects_per_s": nodes / seconds})

    note = f"failed: reading the moved list took more than {deadline_s:.0f} s"
    try:
        with limits.watchdog.deadline(deadline_s, overrun(move, note)):
            check = _check_moved(head, tail, nodes, backend_b)
    except Exception as exc:  # noqa: BLE001 - recorded, the workload goes on
        move.update(failure(exc))
        move["status"] = f"failed: check after the move: {move['status']}"
        return persist, move
    move["check"] = check
    move["status"] = "ok" if check["ok"] else f"failed: {check['problem']}"
    return persist, move


def run_workload(
    model: ModuleType,
    client_kwargs: dict[str, Any],
    expected_backends: int,
    plan: Plan,
    report: Report,
    limits: ListLimits,
    list_sizes: tuple[int, ...] = LIST_SIZES,
) -> None:
    """Start a client, measure every operation into ``report``, stop the client.

    Args:
        model: ``model_dataclay`` or ``model_hpc``.
        client_kwargs: keyword arguments for the library's ``Client``.
        expected_backends: wait until this many backends are registered (>= 2).
        plan: counts for the per-operation rows.
        report: where each result goes as soon as it is known.
        limits: see :class:`ListLimits`.
        list_sizes: lengths of the lists.

    A list operation past its deadline ends the process (exit code 0) once
    the report is written; see the module docstring.
    """
    client = model.Client(**client_kwargs)
    client.start()
    try:
        backend_ids = wait_for_backends(client, expected_backends, BACKEND_WAIT_S)
        if len(backend_ids) < 2:
            raise RuntimeError(f"moves need 2 backends, got {len(backend_ids)}")
        backend_a, backend_b = backend_ids[0], backend_ids[1]
        report.data["backends"] = [str(backend) for backend in backend_ids]
        report.save()

        for key, bench in (
            ("versioning", lambda: bench_versioning(model, backend_a, plan)),
            (
                "versioning_same_backend",
                lambda: bench_versioning(model, backend_a, plan, backend_a),
            ),
        ):
            try:
                entry = bench()
            except Exception as exc:  # noqa: BLE001 - recorded, the workload goes on
                entry = failure(exc)
            report.record(key, entry)

        for index, nodes in enumerate(list_sizes):

            def on_timeout(
                persist: dict[str, Any],
                move: dict[str, Any],
                nodes: int = nodes,
                left: tuple[int, ...] = list_sizes[index + 1 :],
            ) -> None:
                results = report.data["results"]
                results[f"make_persistent_list_{nodes}"] = persist
                results[f"recursive_move_{nodes}"] = move
                skipped = {"status": "skipped: an earlier operation timed out"}
                for size in left:
                    results[f"make_persistent_list_{size}"] = dict(skipped)
                    results[f"recursive_move_{size}"] = dict(skipped)
                report.data["abandoned"] = (
                    f"a list operation on {nodes} nodes overran its deadline"
                )

            persist, move = bench_list(
                model, nodes, backend_a, backend_b, limits, on_timeout
            )
            report.record(f"make_persistent_list_{nodes}", persist)
            report.record(f"recursive_move_{nodes}", move)
    finally:
        client.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the workload and write its JSON report.

    Args:
        argv: command-line arguments without the program name.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(DISTRIBUTIONS), required=True)
    parser.add_argument("--out", required=True, type=Path, help="JSON report file")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--host", help="dataClay metadata service host")
    parser.add_argument("--port", type=int, help="dataClay metadata service port")
    parser.add_argument("--backends", type=int, default=2, help="backends to wait for")
    parser.add_argument(
        "--deadline",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help="deadline of each list operation, in seconds",
    )
    parser.add_argument(
        "--node-by-node-max",
        type=int,
        default=DEFAULT_NODE_BY_NODE_MAX,
        help="longest list made persistent node by node when one call fails",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: tuple(int(size) for size in text.split(",")),
        default=LIST_SIZES,
        help="comma-separated list lengths",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    model = importlib.import_module(args.model)
    client_kwargs = {
        key: value
        for key, value in (("host", args.host), ("port", args.port))
        if value is not None
    }
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    report = Report(
        args.out,
        {
            "library": model.LIBRARY,
            "version": library_version(args.model),
            "python": platform.python_version(),
            "recursion_limit": sys.getrecursionlimit(),
            "plan": asdict(plan),
            "list_sizes": list(args.sizes),
            "deadline_s": args.deadline,
            "node_by_node_max": args.node_by_node_max,
            "run_id": uuid.uuid4().hex[:12],
        },
    )
    limits = ListLimits(args.deadline, args.node_by_node_max, Watchdog(report))
    run_workload(model, client_kwargs, args.backends, plan, report, limits, args.sizes)
    report.data["complete"] = True
    report.save()
    return 0


def _persist_node_by_node(built: list[Any], backend_id: object) -> None:
    # Last node first: each node's successor is already persistent, so every
    # call stores exactly one object.
    for node in built:
        if not node._dc_is_registered:
            node.make_persistent(backend_id=backend_id)


def _check_moved(head: Any, tail: Any, nodes: int, backend_b: object) -> dict[str, Any]:
    # Reading an attribute makes the library find the object where it now is,
    # which updates the proxy's master_backend_id.
    payload = tail.payload
    head_payload = head.payload
    tail_where = str(tail._dc_meta.master_backend_id)
    head_where = str(head._dc_meta.master_backend_id)
    check = {
        "last_node_payload": payload,
        "last_node_master_backend_id": tail_where,
        "head_master_backend_id": head_where,
        "expected_backend_id": str(backend_b),
        "ok": True,
    }
    if payload != nodes - 1 or head_payload != 0:
        check["problem"] = (
            f"payloads after the move are {head_payload!r} (head) and {payload!r} "
            f"(last node), expected 0 and {nodes - 1}"
        )
    elif tail_where != str(backend_b):
        check["problem"] = (
            f"the last node's master_backend_id is {tail_where} after the move, "
            f"expected {backend_b}"
        )
    elif head_where != str(backend_b):
        check["problem"] = (
            f"the head's master_backend_id is {head_where} after the move, "
            f"expected {backend_b}"
        )
    check["ok"] = "problem" not in check
    return check


def _timeout(deadline_s: float) -> dict[str, Any]:
    return {
        "status": f"timeout > {deadline_s:.0f} s",
        "deadline_s": deadline_s,
        "s_lower_bound": deadline_s,
    }


if __name__ == "__main__":
    sys.exit(main())
