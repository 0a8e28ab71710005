"""Benchmark model classes for dataclay_hpc.

The same classes as ``model_dataclay``; only the import differs. The backends
of the job import this module by name, so ``benchmarks/`` must be on their
``PYTHONPATH``.
"""

import numpy as np

from dataclay_hpc import Client, DataClayObject, activemethod

__all__ = ["LIBRARY", "Client", "Employee", "Holder", "Node"]

#: Name of the library under test, as it appears in reports.
LIBRARY = "dataclay_hpc"


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
