r"""Persistent objects made from many threads, each in its caller's session.

The multithreading scenario of dataClay's guide, as written there (one copied
context, jobs one after another), then the same with every job running at
once (one copied context per job) and with ``ContextThreadPoolExecutor``,
which copies the context by itself; then threads working in datasets of
their own, and active methods limited to one BLAS thread. Run it from the
repository root, on its own or as the driver of a job::

    .venv/bin/python examples/multithreading.py
    .venv/bin/dataclay-hpc run --backends 2 -- \
        .venv/bin/python examples/multithreading.py

It prints ``multithreading: OK`` at the end, and exits with a non-zero code
when a check fails.
"""

import contextvars
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy
from model import Person, Sensor

from dataclay_hpc import (
    Client,
    ContextThreadPoolExecutor,
    constraints,
    use_dataset,
)
from dataclay_hpc.exceptions import DatasetAccessError

JOBS = 10


def guide_example() -> None:
    """The guide's code: one copied context, each job waited for in turn."""
    current_context = contextvars.copy_context()

    def job(name, age):
        person = Person(name, age)
        person.make_persistent()

    with ThreadPoolExecutor() as executor:
        for i in range(JOBS):
            future = executor.submit(current_context.run, job, f"Name{i}", i)
            print(future.result())


def all_at_once(tag: str) -> list[int]:
    """Every job at once, each in its own copy of the context."""

    def job(name, age):
        person = Person(name, age)
        person.make_persistent(alias=name)
        return Person.get_by_alias(name).age

    with ThreadPoolExecutor(max_workers=JOBS) as executor:
        futures = [
            executor.submit(contextvars.copy_context().run, job, f"{tag}-{i}", i)
            for i in range(JOBS)
        ]
        return [future.result(timeout=120) for future in futures]


def with_context_executor(tag: str) -> list[int]:
    """ContextThreadPoolExecutor: no copying by hand."""

    def job(i):
        person = Person(f"{tag}-ctx-{i}", i)
        person.make_persistent()
        return person.birthday()

    with ContextThreadPoolExecutor(max_workers=JOBS) as executor:
        return list(executor.map(job, range(JOBS), timeout=120))


def datasets_per_thread(tag: str) -> list[str]:
    """Each job in a dataset of its own, all with the same alias."""

    def job(i):
        with use_dataset(f"{tag}-site-{i}"):
            sensor = Sensor(f"site {i}", numpy.full(1000, float(i)))
            sensor.make_persistent(alias="sensor")
            return Sensor.get_by_alias("sensor").name

    with ContextThreadPoolExecutor(max_workers=JOBS) as executor:
        names = list(executor.map(job, range(JOBS), timeout=120))

    # another dataset of the same user: readable when named, not changeable
    with use_dataset(f"{tag}-site-0"):
        neighbour = Sensor.get_by_alias("sensor", dataset_name=f"{tag}-site-1")
        assert neighbour.name == "site 1"
        try:
            neighbour.unit = "C"
        except DatasetAccessError as denied:
            print(f"denied as expected: {denied}")
        else:
            raise AssertionError("a session of site-0 changed an object of site-1")
    with use_dataset(f"{tag}-site-1"):
        neighbour.unit = "C"
        # numerical libraries inside the method use one thread at most
        with constraints(max_threads=1):
            assert neighbour.mean() == 1.0
    return names


def main() -> None:
    """Run the scenarios and check their outcomes."""
    tag = uuid.uuid4().hex[:8]
    with Client() as client:
        print(f"{len(client.get_backends())} backends")
        guide_example()
        assert all_at_once(tag) == list(range(JOBS))
        print(f"{JOBS} jobs at once, each in its own copied context")
        assert with_context_executor(tag) == [i + 1 for i in range(JOBS)]
        print(f"{JOBS} jobs in a ContextThreadPoolExecutor")
        assert datasets_per_thread(tag) == [f"site {i}" for i in range(JOBS)]
        print(f"{JOBS} jobs, each in a dataset of its own")
        for i in range(JOBS):
            Person.delete_alias(f"{tag}-{i}")
    print("multithreading: OK")


if __name__ == "__main__":
    main()
