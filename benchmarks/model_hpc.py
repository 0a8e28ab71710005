"""Benchmark model classes for dataclay_hpc.

The same classes as ``model_dataclay``; only the import differs. The backends
of the job import this module by name, so ``benchmarks/`` must be on their
``PYTHONPATH``. :func:`thread_pool` and :func:`submit` run work on threads in
the caller's session the way dataclay_hpc documents it.
"""

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from dataclay_hpc import Client, ContextThreadPoolExecutor, DataClayObject, activemethod

__all__ = [
    "LIBRARY",
    "Client",
    "Employee",
    "Holder",
    "Node",
    "submit",
    "thread_pool",
]

#: Name of the library under test, as it appears in reports.
LIBRARY = "dataclay_hpc"

T = TypeVar("T")


def thread_pool(max_workers: int) -> ContextThreadPoolExecutor:
    """Return a pool whose every submitted job runs in the submitter's session.

    ``ContextThreadPoolExecutor`` copies the submitting thread's context in
    each ``submit``.
    """
    return ContextThreadPoolExecutor(max_workers=max_workers)


def submit(
    pool: ContextThreadPoolExecutor, fn: Callable[..., T], /, *args: Any
) -> Future[T]:
    """Run ``fn(*args)`` on ``pool``; the pool carries the session itself."""
    return pool.submit(fn, *args)


class Employee(DataClayObject):
    """A small object: one string and one float attribute."""

    name: str
    salary: float

    def __init__(self, name: str, salary: float) -> None:
        """Create an employee with a name and a salary."""
        self.name = name
        self.salary = salary

    @activemethod
    def raise_salary(self, pct: float) -> float:
        """Raise the salary by ``pct`` (a fraction) and return the new salary."""
        self.salary = self.salary * (1.0 + pct)
        return self.salary


class Holder(DataClayObject):
    """An object holding one numpy array."""

    data: np.ndarray

    def __init__(self, data: np.ndarray) -> None:
        """Hold ``data``."""
        self.data = data


class Node(DataClayObject):
    """One node of a singly linked list: a small payload and the next node."""

    payload: int
    next: "Node | None"

    def __init__(self, payload: int, next_node: "Node | None" = None) -> None:
        """Create a node holding ``payload`` that links to ``next_node``."""
        self.payload = payload
        self.next = next_node
