r"""Persistent objects made from many threads, each in its caller's session.

The multithreading scenario of dataClay's guide, as written there (one copied
context, jobs one after another), then the same with every job running at
once (one copied context per job) and with ``ContextThreadPoolExecutor``,
which copies the context by itself. Run it from the repository root, on its
own or as the driver of a job::

    .venv/bin/python examples/multithreading.py
    .venv/bin/dataclay-hpc run --backends 2 -- \
        .venv/bin/python examples/multithreading.py

It prints ``multithreading: OK`` at the end, and exits with a non-zero code
when a check fails.
"""

import contextvars
import uuid
from concurrent.futures import ThreadPoolExecutor

from model import Person

from dataclay_hpc import Client, ContextThreadPoolExecutor

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


def main() -> None:
    """Run the three scenarios and check their outcomes."""
    tag = uuid.uuid4().hex[:8]
    with Client() as client:
        print(f"{len(client.get_backends())} backends")
        guide_example()
        assert all_at_once(tag) == list(range(JOBS))
        print(f"{JOBS} jobs at once, each in its own copied context")
        assert with_context_executor(tag) == [i + 1 for i in range(JOBS)]
        print(f"{JOBS} jobs in a ContextThreadPoolExecutor")
        for i in range(JOBS):
            Person.delete_alias(f"{tag}-{i}")
    print("multithreading: OK")


if __name__ == "__main__":
    main()
