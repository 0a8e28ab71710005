"""Model classes of the examples and the documentation.

Backends import model classes by module path, so these classes live in a
module of their own rather than in the script that uses them. A script in
``examples/`` imports them as ``from model import Person``; the client passes
the script's folder on to the backends, which then import ``model`` too.
"""

from __future__ import annotations

import asyncio
import threading

import numpy

from dataclay_hpc import DataClayObject, activemethod


class Person(DataClayObject):
    """A person with a name and an age."""

    name: str
    age: int

    def __init__(self, name: str, age: int) -> None:
        """Create a person."""
        self.name = name
        self.age = age

    @activemethod
    def birthday(self) -> int:
        """Add one year to the age and return the new age."""
        self.age += 1
        return self.age


class Employee(DataClayObject):
    """An employee with a name and a salary."""

    name: str
    salary: float

    def __init__(self, name: str, salary: float) -> None:
        """Create an employee."""
        self.name = name
        self.salary = salary

    @activemethod
    def raise_salary(self, pct: float) -> float:
        """Raise the salary by ``pct`` percent and return the new salary."""
        self.salary = round(self.salary * (1 + pct / 100), 2)
        return self.salary


class Company(DataClayObject):
    """A company with a name and one employee."""

    name: str
    employee: Employee

    def __init__(self, name: str, employee: Employee) -> None:
        """Create a company."""
        self.name = name
        self.employee = employee

    @activemethod
    def payroll(self) -> float:
        """Return the salary the company pays."""
        return self.employee.salary

    @activemethod
    def raise_all(self, pct: float) -> float:
        """Raise the employee's salary by ``pct`` percent; return the new salary.

        When the employee is held by another backend than the company, this
        call goes from the company's backend to the employee's.
        """
        return self.employee.raise_salary(pct)

    @activemethod
    def hire(self, name: str, salary: float) -> Employee:
        """Replace the employee by a new one, made on the company's backend."""
        self.employee = Employee(name, salary)
        return self.employee

    @activemethod
    def where(self) -> str:
        """Return the id of the backend that runs this method."""
        return str(self._dc_meta.master_backend_id)


class Sensor(DataClayObject):
    """A sensor and its readings, kept as a numpy array."""

    name: str
    readings: numpy.ndarray
    unit: str = "K"  # a class-level default

    def __init__(self, name: str, readings: numpy.ndarray) -> None:
        """Create a sensor."""
        self.name = name
        self.readings = readings
        self.label = f"sensor {name}"  # no annotation: transient

    @activemethod
    def mean(self) -> float:
        """Return the mean of the readings."""
        return float(self.readings.mean())

    @activemethod
    async def mean_after(self, delay_s: float) -> float:
        """Wait ``delay_s`` seconds on the backend, then return the mean."""
        await asyncio.sleep(delay_s)
        return float(self.readings.mean())


class Counter(DataClayObject):
    """A counter guarded by a lock, which cannot be pickled."""

    count: int

    def __init__(self) -> None:
        """Create a counter at zero."""
        self.count = 0
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Return what is sent to a backend and written to the store."""
        return {"count": self.count}

    def __setstate__(self, state: dict) -> None:
        """Rebuild the object from ``__getstate__``'s result: a new lock."""
        self.count = state["count"]
        self.lock = threading.Lock()

    @activemethod
    def increment(self) -> int:
        """Add one and return the new count."""
        with self.lock:
            self.count += 1
            return self.count
