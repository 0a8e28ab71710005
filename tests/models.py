"""Model classes the tests make persistent (backends import them from here)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, ClassVar

import numpy as np

from dataclay_hpc import DataClayObject, activemethod


class Person(DataClayObject):
    name: str
    age: int
    nickname: str = "none"

    def __init__(self, name: str, age: int) -> None:
        self.name = name
        self.age = age
        self.scratch = "transient"

    @activemethod
    def birthday(self) -> int:
        self.age += 1
        return self.age

    @activemethod
    def where(self) -> tuple[int, bool]:
        return os.getpid(), self._dc_is_local

    @activemethod
    async def shout(self) -> str:
        return self.name.upper()

    @activemethod
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @activemethod
    def crash(self, code: int) -> None:
        os._exit(code)

    @activemethod
    def get_scratch(self) -> Any:
        return getattr(self, "scratch", None)

    @activemethod
    def give_lock(self) -> Any:
        return threading.Lock()

    @activemethod
    def echo(self, value: Any) -> Any:
        return value

    @activemethod
    def nap(self, seconds: float) -> None:
        time.sleep(seconds)

    def plain_method(self) -> str:
        return f"{self.name} ({self.age})"


class Label(str):
    """A str that is not exactly a str: it carries an attribute of its own."""

    owner: Any = None


class Node(DataClayObject):
    value: int
    next: Node | None
    kind: ClassVar[str] = "node"

    def __init__(self, value: int, next: Node | None = None) -> None:
        self.value = value
        self.next = next

    @activemethod
    def length(self) -> int:
        count, node = 0, self
        while node is not None:
            count += 1
            node = node.next
        return count

    @activemethod
    def value_age(self) -> int:
        return self.value.age

    @activemethod
    def total(self) -> int:
        total, node, seen = 0, self, set()
        while node is not None and node._dc_meta.id not in seen:
            seen.add(node._dc_meta.id)
            total += node.value
            node = node.next
        return total


class Company(DataClayObject):
    name: str
    people: list

    def __init__(self, name: str) -> None:
        self.name = name
        self.people = []

    @activemethod
    def hire(self, name: str, age: int) -> Person:
        person = Person(name, age)
        self.people = [*self.people, person]
        return person

    @activemethod
    def add(self, person: Person) -> int:
        self.people = [*self.people, person]
        return len(self.people)

    @activemethod
    def ages(self) -> list[int]:
        return [p.age for p in self.people]

    @activemethod
    def birthdays(self) -> list[int]:
        return [p.birthday() for p in self.people]

    @activemethod
    def where_people(self) -> list[Any]:
        return [p._dc_meta.master_backend_id for p in self.people]


class Matrix(DataClayObject):
    data: np.ndarray
    label: str

    def __init__(self, data: np.ndarray, label: str = "m") -> None:
        self.data = data
        self.label = label

    @activemethod
    def sum(self) -> float:
        return float(self.data.sum())


class Custom(DataClayObject):
    """Keeps its state through __getstate__/__setstate__."""

    value: int
    restored: int

    def __init__(self, value: int) -> None:
        self.value = value
        self.restored = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"packed": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.value = state["packed"]
        self.restored = 1

    @activemethod
    def read(self) -> tuple[int, int]:
        return self.value, self.restored


class Guarded(DataClayObject):
    """Rebuilds a transient lock in __setstate__; methods use only the lock first."""

    count: int

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"count": self.count}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.lock = threading.Lock()

    @activemethod
    def increment(self) -> int:
        with self.lock:
            self.count += 1
            return self.count


class Solver(DataClayObject):
    """Reports the native thread pools its active methods run with."""

    label: str
    partner: Any

    def __init__(self, label: str, partner: Any = None) -> None:
        self.label = label
        self.partner = partner

    @activemethod
    def native_threads(self) -> tuple[int | None, int | None]:
        """Return (BLAS threads now, max_threads of the running context)."""
        from threadpoolctl import threadpool_info

        from dataclay_hpc import current_constraints

        blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        return (min(blas) if blas else None), current_constraints().max_threads

    @activemethod
    def partner_native_threads(self) -> tuple[int | None, int | None]:
        """Ask the partner (possibly on another backend) the same question."""
        return self.partner.native_threads()

    @activemethod
    def hold_native_threads(self, seconds: float) -> tuple[int | None, int | None]:
        """Return the pools' setting after ``seconds`` inside the method."""
        time.sleep(seconds)
        return self.native_threads()

    @activemethod
    def relabel_partner(self, label: str) -> str:
        """Change the partner from inside the job (a nested request)."""
        self.partner.label = label
        return self.partner.label


class Saboteur(DataClayObject):
    """Makes its backend fail to take one object sent to it.

    A stand-in for a failure no input can cause there (the backend running out
    of memory while it takes a plain object of a class it already holds).
    """

    @activemethod
    def refuse_next_store_of(self, object_id: str) -> None:
        from dataclay_hpc.object import process_backend

        backend = process_backend()
        assert backend is not None
        take = backend._materialize

        def refuse(records: list) -> None:
            if any(str(meta.id) == object_id for _, meta, _ in records):
                del backend._materialize  # once
                raise MemoryError("the backend could not take the object")
            take(records)

        backend._materialize = refuse  # type: ignore[method-assign]


class Inspector(DataClayObject):
    """Looks into its backend without asking it for anything else."""

    @activemethod
    def holds(self, object_id: str) -> bool:
        """Whether this backend holds the object, its arrivals left untaken."""
        from dataclay_hpc.object import process_backend

        backend = process_backend()
        assert backend is not None
        return any(str(key) == object_id for key in list(backend.objects))

    @activemethod
    def drop_arrivals(self) -> int:
        """Close this backend's end of every connection for arrivals."""
        from dataclay_hpc.object import process_backend

        backend = process_backend()
        assert backend is not None
        server = backend.server
        inbounds = server._arrival_inbounds
        for inbound in inbounds:
            server._drop_arrivals(inbound, ConnectionResetError("dropped by a test"))
        return len(inbounds)


class Shelf:
    """A plain namespace: classes nested in it have dotted qualified names."""

    class Book(DataClayObject):
        title: str

        def __init__(self, title: str) -> None:
            self.title = title
