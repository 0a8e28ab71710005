"""The benchmark workload, written once and run against either library.

The model module passed on the command line (``model_dataclay`` or
``model_hpc``) supplies ``Client``, ``Employee`` and ``Holder``; everything
else is shared, so both libraries run exactly the same calls. The result is
written as JSON to the file named by ``--out``.

Run directly only for debugging; ``run.py`` starts this script in the right
environment for each library.
"""

import argparse
import importlib
import importlib.metadata
import itertools
import json
import logging
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

#: Size of the array moved by the round-trip benchmark, in bytes.
ARRAY_BYTES = 100_000_000
#: How long to wait for the expected number of backends to register, in seconds.
BACKEND_WAIT_S = 60.0
#: Threads of the threaded rows; each runs ``ops_per_repeat`` operations per repeat.
THREADS = 8
#: Distribution package name of each model module's library.
DISTRIBUTIONS = {"model_dataclay": "dataclay", "model_hpc": "dataclay_hpc"}


class BackendLister(Protocol):
    """The part of either library's ``Client`` that lists backends."""

    def get_backends(self) -> Mapping[Any, object]:
        """Return backend id to backend info."""
        ...


@dataclass(frozen=True)
class Plan:
    """How many operations to run.

    Attributes:
        ops_per_repeat: operations timed together in one repeat.
        repeats: timed repeats; the reported value is their median.
        warmup_ops: untimed operations run before the first repeat.
        array_repeats: timed round trips of the large array (after one untimed).
    """

    ops_per_repeat: int
    repeats: int
    warmup_ops: int
    array_repeats: int


FULL_PLAN = Plan(ops_per_repeat=200, repeats=7, warmup_ops=50, array_repeats=3)
QUICK_PLAN = Plan(ops_per_repeat=40, repeats=3, warmup_ops=10, array_repeats=1)


def time_per_op(op: Callable[[], object], plan: Plan) -> dict[str, Any]:
    """Time ``op`` in batches and return the median time per call.

    Args:
        op: the operation; called ``warmup_ops + repeats * ops_per_repeat`` times.
        plan: the counts to use.

    Returns:
        ``us``: median over repeats of the mean time per call, in microseconds;
        ``min_us``: the fastest repeat; ``samples_us``: the mean of every
        repeat; ``ops_per_repeat``.
    """
    for _ in range(plan.warmup_ops):
        op()

    samples_us = []
    for _ in range(plan.repeats):
        start = time.perf_counter()
        for _ in range(plan.ops_per_repeat):
            op()
        elapsed_s = time.perf_counter() - start
        samples_us.append(elapsed_s / plan.ops_per_repeat * 1e6)

    return _latency(samples_us, plan)


def wait_for_backends(
    client: BackendLister, expected: int, timeout_s: float
) -> list[object]:
    """Return the backend ids once at least ``expected`` backends are known.

    Args:
        client: a started ``Client`` of either library.
        expected: number of backends the deployment was started with.
        timeout_s: deadline for the backends to appear.

    Returns:
        The backend ids, in the order ``get_backends()`` gives them.

    Raises:
        TimeoutError: fewer than ``expected`` backends after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        backend_ids = list(client.get_backends())
        if len(backend_ids) >= expected:
            return backend_ids
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(backend_ids)} of {expected} backends registered after "
                f"{timeout_s:.0f} s; check the backend logs"
            )
        time.sleep(0.2)


def bench_small_ops(
    model: ModuleType, backend_id: object, plan: Plan
) -> dict[str, Any]:
    """Measure attribute access, activemethod, make_persistent and get_by_alias.

    Args:
        model: the model module of the library under test.
        backend_id: backend that receives every object.
        plan: the counts to use.

    Returns:
        One entry per operation, as returned by :func:`time_per_op`, plus checks.
    """
    alias = f"bench-employee-{uuid.uuid4().hex[:12]}"
    employee = model.Employee("alice", 100.0)
    employee.make_persistent(alias=alias, backend_id=backend_id)
    results: dict[str, Any] = {}

    results["attr_read"] = time_per_op(lambda: employee.name, plan)

    def write_salary() -> None:
        employee.salary = 1.0

    results["attr_write"] = time_per_op(write_salary, plan)
    if employee.salary != 1.0:
        raise AssertionError(f"attribute write lost: salary is {employee.salary!r}")

    results["activemethod"] = time_per_op(lambda: employee.raise_salary(0.01), plan)
    if not isinstance(employee.raise_salary(0.0), float):
        raise AssertionError("raise_salary did not return a float")

    results["make_persistent"] = _time_make_persistent(model, backend_id, plan)

    found = model.Employee.get_by_alias(alias)
    results["get_by_alias"] = time_per_op(
        lambda: model.Employee.get_by_alias(alias), plan
    )
    results["get_by_alias"]["same_object"] = found is employee
    return results


def bench_move_one(
    model: ModuleType, backend_a: object, backend_b: object, plan: Plan
) -> dict[str, Any]:
    """Time ``employee.move(...)``, alternating between two backends.

    Args:
        model: the model module of the library under test.
        backend_a: backend the object starts on.
        backend_b: the other backend.
        plan: the counts to use.

    Returns:
        As :func:`time_per_op`.

    Raises:
        AssertionError: the object is not where the last move sent it.
    """
    employee = model.Employee("mover", 1.0)
    employee.make_persistent(backend_id=backend_a)
    targets = itertools.cycle((backend_b, backend_a))
    last: list[object] = [backend_a]

    def move_once() -> None:
        target = next(targets)
        employee.move(target)
        last[0] = target

    entry = time_per_op(move_once, plan)
    if employee.name != "mover":
        raise AssertionError(f"moved object reads name={employee.name!r}")
    where = employee._dc_meta.master_backend_id
    if str(where) != str(last[0]):
        raise AssertionError(f"object is on {where} after moving it to {last[0]}")
    return entry


def _time_make_persistent(
    model: ModuleType, backend_id: object, plan: Plan
) -> dict[str, Any]:
    # Objects are built before the clock starts, so only the call is timed.
    for index in range(plan.warmup_ops):
        model.Employee(f"warm-{index}", 1.0).make_persistent(backend_id=backend_id)

    samples_us = []
    for repeat in range(plan.repeats):
        employees = [
            model.Employee(f"new-{repeat}-{index}", 1.0)
            for index in range(plan.ops_per_repeat)
        ]
        start = time.perf_counter()
        for employee in employees:
            employee.make_persistent(backend_id=backend_id)
        # a library may return before the backend has the object: the read
        # waits until it has them all
        if employees[-1].name != f"new-{repeat}-{plan.ops_per_repeat - 1}":
            raise AssertionError("the last object made persistent was not stored")
        elapsed_s = time.perf_counter() - start
        samples_us.append(elapsed_s / plan.ops_per_repeat * 1e6)

    return _latency(samples_us, plan)


def bench_threads(
    model: ModuleType, backend_id: object, plan: Plan, threads: int = THREADS
) -> dict[str, Any]:
    """Measure make_persistent and an activemethod from ``threads`` threads at once.

    Every thread runs in the session of the calling thread, the way each
    library documents it (``model.thread_pool`` and ``model.submit``). The
    value is the wall time of a repeat divided by all the operations of all
    threads in it: the time per operation the caller sees at that throughput.

    Args:
        model: the model module of the library under test.
        backend_id: backend that receives every object.
        plan: the counts to use.
        threads: threads running at once.

    Returns:
        ``make_persistent_threads`` and ``activemethod_threads``, each as
        :func:`time_per_op` returns it, with ``threads``.

    Raises:
        AssertionError: an object made by a thread is not where it was put.
    """
    per_thread = plan.ops_per_repeat

    def make(tag: str) -> list[object]:
        employees = [model.Employee(f"{tag}-{i}", 1.0) for i in range(per_thread)]
        for employee in employees:
            employee.make_persistent(backend_id=backend_id)
        # timed too: the read waits until the backend holds every object
        if employees[-1].name != f"{tag}-{per_thread - 1}":
            raise AssertionError("the last object made persistent was not stored")
        return employees

    def call(employee: Any) -> None:
        for _ in range(per_thread):
            employee.raise_salary(0.0)

    results: dict[str, Any] = {}
    with model.thread_pool(threads) as pool:
        for name, job, args in (
            ("make_persistent_threads", make, [f"t{i}" for i in range(threads)]),
            ("activemethod_threads", call, None),
        ):
            if args is None:
                args = [model.Employee(f"c{i}", 1.0) for i in range(threads)]
                for employee in args:
                    employee.make_persistent(backend_id=backend_id)
            # One untimed pass starts every thread and connection.
            for future in [model.submit(pool, job, arg) for arg in args]:
                future.result()
            samples_us = []
            for _ in range(plan.repeats):
                start = time.perf_counter()
                done = [model.submit(pool, job, arg) for arg in args]
                outputs = [future.result() for future in done]
                elapsed_s = time.perf_counter() - start
                samples_us.append(elapsed_s / (threads * per_thread) * 1e6)
            results[name] = {**_latency(samples_us, plan), "threads": threads}
            if name == "make_persistent_threads":
                made = outputs[0]
                if made[-1].name != f"{args[0]}-{per_thread - 1}":
                    raise AssertionError("an object made by a thread was lost")
    return results


def bench_array(model: ModuleType, backend_id: object, plan: Plan) -> dict[str, Any]:
    """Measure a round trip of a 100 MB float64 array through a persistent attribute.

    One round trip is ``holder.data = array`` followed by ``holder.data``; the
    bandwidth counts both directions (2 x 100 MB per round trip). The first
    round trip is untimed.

    Args:
        model: the model module of the library under test.
        backend_id: backend that holds the object.
        plan: the counts to use.

    Returns:
        ``gbps`` (median), ``s`` (median round trip), and per-repeat set and
        get times in seconds.

    Raises:
        AssertionError: the array read back differs from the one written.
    """
    array = np.random.default_rng(0).random(ARRAY_BYTES // 8)
    holder = model.Holder(np.zeros(1))
    holder.make_persistent(backend_id=backend_id)

    set_s: list[float] = []
    get_s: list[float] = []
    for repeat in range(plan.array_repeats + 1):
        start = time.perf_counter()
        holder.data = array
        written = time.perf_counter()
        back = holder.data
        done = time.perf_counter()

        if back.shape != array.shape or not np.array_equal(back, array):
            raise AssertionError("array read back differs from the array written")
        del back
        if repeat > 0:
            set_s.append(written - start)
            get_s.append(done - written)

    round_trip_s = statistics.median(s + g for s, g in zip(set_s, get_s, strict=True))
    return {
        "gbps": 2 * ARRAY_BYTES / round_trip_s / 1e9,
        "s": round_trip_s,
        "set_s": set_s,
        "get_s": get_s,
        "bytes": ARRAY_BYTES,
    }


def run_workload(
    model: ModuleType,
    client_kwargs: dict[str, Any],
    expected_backends: int,
    plan: Plan,
) -> dict[str, Any]:
    """Start a client, run every benchmark against one backend, stop the client.

    Args:
        model: ``model_dataclay`` or ``model_hpc``.
        client_kwargs: keyword arguments for the library's ``Client``.
        expected_backends: wait until this many backends are registered.
        plan: the counts to use.

    Returns:
        The library name, the plan, the backend used and one entry per operation.
    """
    client = model.Client(**client_kwargs)
    client.start()
    try:
        backend_ids = wait_for_backends(client, expected_backends, BACKEND_WAIT_S)
        backend_id = backend_ids[0]
        logger.info("benchmarking against backend %s", backend_id)

        results = bench_small_ops(model, backend_id, plan)
        if len(backend_ids) > 1:
            results["move_one"] = bench_move_one(
                model, backend_ids[0], backend_ids[1], plan
            )
        results.update(bench_threads(model, backend_id, plan))
        results["array_roundtrip"] = bench_array(model, backend_id, plan)
    finally:
        client.stop()

    return {
        "library": model.LIBRARY,
        "backends": [str(backend) for backend in backend_ids],
        "plan": asdict(plan),
        "results": results,
    }


def _latency(samples_us: list[float], plan: Plan) -> dict[str, Any]:
    return {
        "us": statistics.median(samples_us),
        "min_us": min(samples_us),
        "samples_us": samples_us,
        "ops_per_repeat": plan.ops_per_repeat,
    }


def library_version(model_name: str) -> str:
    """Return the installed version of the library behind ``model_name``."""
    try:
        return importlib.metadata.version(DISTRIBUTIONS[model_name])
    except importlib.metadata.PackageNotFoundError:
        package = importlib.import_module(DISTRIBUTIONS[model_name])
        return str(getattr(package, "__version__", "unknown"))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the workload and write its JSON report.

    Args:
        argv: command-line arguments without the program name.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(DISTRIBUTIONS), required=True)
    parser.add_argument("--out", required=True, help="file to write the JSON to")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--host", help="dataClay metadata service host")
    parser.add_argument("--port", type=int, help="dataClay metadata service port")
    parser.add_argument("--backends", type=int, default=1, help="backends to wait for")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    model = importlib.import_module(args.model)
    client_kwargs = {
        key: value
        for key, value in (("host", args.host), ("port", args.port))
        if value is not None
    }
    plan = QUICK_PLAN if args.quick else FULL_PLAN

    report = run_workload(model, client_kwargs, args.backends, plan)
    report["version"] = library_version(args.model)
    report["python"] = platform.python_version()
    report["numpy"] = np.__version__
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
