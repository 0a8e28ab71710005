"""Execution constraints that travel with the work, as the session does.

``constraints(max_threads=N)`` sets them for the running context; every active
method called in that context (and every nested call it makes, on any backend)
runs with them. ``max_threads`` caps the threads of the native thread pools
(OpenBLAS, MKL, BLIS, OpenMP) that numerical libraries use inside the method,
so that the methods of several objects on one node do not oversubscribe its
cores.

The native pools are process-wide: while several constrained methods run at
once on one backend, the smallest of their limits applies to all of them, and
the pools return to their own setting when the last one ends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import logging
import threading
from collections.abc import Iterator
from typing import Any

from threadpoolctl import threadpool_limits

__all__ = ["Constraints", "constraints", "current_constraints"]

logger = logging.getLogger(__name__)

#: Deadline for changing the native thread pools' size, in seconds.
SET_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Constraints:
    """How the active methods of a context may run.

    Attributes:
        max_threads: Most threads of the native thread pools (BLAS, OpenMP)
            inside an active method; ``None`` leaves them as they are.
    """

    max_threads: int | None = None


NO_CONSTRAINTS = Constraints()

_constraints: contextvars.ContextVar[Constraints] = contextvars.ContextVar(
    "dataclay_hpc_constraints", default=NO_CONSTRAINTS
)


def current_constraints() -> Constraints:
    """Return the execution constraints of the running context."""
    return _constraints.get()


@contextlib.contextmanager
def constraints(*, max_threads: int | None = None) -> Iterator[Constraints]:
    """Run the block's active method calls with these constraints.

    Args:
        max_threads: Most threads of the native thread pools (BLAS, OpenMP)
            inside each active method; ``None`` lifts an outer limit.

    Raises:
        ValueError: ``max_threads`` is not a positive integer or ``None``.
    """
    if max_threads is not None and (
        isinstance(max_threads, bool)
        or not isinstance(max_threads, int)
        or max_threads < 1
    ):
        raise ValueError(
            f"max_threads must be a positive integer or None, got {max_threads!r}; "
            "e.g. constraints(max_threads=4)"
        )
    token = _constraints.set(Constraints(max_threads))
    try:
        yield _constraints.get()
    finally:
        _constraints.reset(token)


@contextlib.contextmanager
def applied(limits: Constraints) -> Iterator[None]:
    """Run the block (an active method, on its backend) under ``limits``."""
    token = _constraints.set(limits)
    try:
        if limits.max_threads is None:
            yield
        else:
            with _native_threads.limit(limits.max_threads):
                yield
    finally:
        _constraints.reset(token)


class _NativeThreadLimit:
    """The process's native thread pools, limited while constrained work runs.

    Every change is made from one thread of its own: OpenBLAS ignores a new
    thread count set from a thread other than the one that set it before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: collections.Counter[int] = collections.Counter()
        self._limiter: Any = None
        self._applied: int | None = None
        self._setter: concurrent.futures.ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def limit(self, max_threads: int) -> Iterator[None]:
        with self._lock:
            self._active[max_threads] += 1
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._active[max_threads] -= 1
                if not self._active[max_threads]:
                    del self._active[max_threads]
                self._apply()

    def _apply(self) -> None:
        wanted = min(self._active) if self._active else None
        if wanted == self._applied:
            return
        if self._setter is None:
            self._setter = concurrent.futures.ThreadPoolExecutor(
                1, "dataclay-hpc-native-threads"
            )
        self._setter.submit(self._set, wanted).result(timeout=SET_TIMEOUT_S)
        logger.debug("native thread pools limited to %s threads", wanted)
        self._applied = wanted

    def _set(self, wanted: int | None) -> None:
        if self._limiter is not None:
            self._limiter.restore_original_limits()
            self._limiter = None
        if wanted is not None:
            self._limiter = threadpool_limits(limits=wanted)


_native_threads = _NativeThreadLimit()
