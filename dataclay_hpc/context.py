"""The session a piece of work runs in: which client, user and dataset.

The session lives in a context variable, so it follows the work wherever the
context is copied: into ``contextvars.copy_context().run``, asyncio tasks,
``asyncio.to_thread`` and ``ContextThreadPoolExecutor``. Every request to a
backend carries the user and dataset, and the backend runs the request in that
session. A thread that never received a context falls back to the process's
default session: the first client started in the process (or the backend
itself, inside a backend).

A dataset belongs to the user who first opens a session on it (``admin`` to
``admin``). Backends check every request a client sends: a session reads and
changes the objects and aliases of its own dataset, only reads those of its
user's other datasets, and reaches nothing of another user's datasets.
``use_dataset`` switches the running context to another dataset of the same
user. Requests that code inside the job sends (an active method calling
another object) are not checked again: a reference reaches what it refers to.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from .exceptions import DataClayException

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["ContextThreadPoolExecutor", "Session", "current_session", "use_dataset"]

DEFAULT_USERNAME = "admin"
DEFAULT_DATASET = "admin"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Session:
    """Who is asking and for which dataset.

    Attributes:
        runtime: Reaches the backends of the job the session belongs to.
        username: The user requests are made as.
        dataset: The dataset new objects and aliases land in.
        inside_job: The session of a request sent by code running in the job
            (an active method's nested request), which backends do not check
            again.
    """

    runtime: Runtime
    username: str = DEFAULT_USERNAME
    dataset: str = DEFAULT_DATASET
    inside_job: bool = False


_session: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "dataclay_hpc_session", default=None
)
_default_lock = threading.Lock()
_default_session: Session | None = None


def current_session() -> Session:
    """Return the session of the running context.

    Raises:
        DataClayException: No client has been started in this process.
    """
    session = _session.get()
    if session is not None:
        return session
    if _default_session is not None:
        return _default_session
    raise DataClayException(
        "no dataclay_hpc session in this process: start a client first "
        "(Client().start(), or `with Client():`), then use persistent objects"
    )


def set_session(session: Session | None) -> contextvars.Token:
    """Make ``session`` the session of the running context."""
    return _session.set(session)


def reset_session(token: contextvars.Token) -> None:
    """Undo a ``set_session``."""
    _session.reset(token)


def set_default_session(session: Session | None, *, replace: bool = False) -> None:
    """Set the process's fallback session, unless one is set already."""
    global _default_session
    with _default_lock:
        if replace or _default_session is None or session is None:
            _default_session = session


def default_session() -> Session | None:
    """Return the process's fallback session, if any."""
    return _default_session


def session_or_none() -> Session | None:
    """Return the session set in the running context, without the fallback."""
    return _session.get()


@contextlib.contextmanager
def use_dataset(dataset: str) -> Iterator[Session]:
    """Run the block in a session of ``dataset``, as the same user and client.

    The dataset is claimed for the user if nobody has used it yet. Objects
    made in the block land in ``dataset``, aliases are looked up there, and
    objects of ``dataset`` may be changed. Threads and tasks started in the
    block with a copied context stay in ``dataset``.

    Raises:
        DatasetAccessError: ``dataset`` belongs to another user.
        ValueError: ``dataset`` is not a non-empty string.
    """
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(
            f"dataset must be a non-empty string, got {dataset!r}; pass the name "
            "of the dataset, e.g. use_dataset('experiment-1')"
        )
    current = current_session()
    session = dataclasses.replace(current, dataset=dataset)
    current.runtime.open_dataset(current.username, dataset, session)
    token = set_session(session)
    try:
        yield session
    finally:
        reset_session(token)


class ContextThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose tasks run in a copy of the submitter's context.

    Each ``submit`` (and so ``map``) copies the submitting thread's context, so
    the task sees the same session (client, user, dataset) without any code of
    its own.
    """

    def submit(  # type: ignore[override]
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a copy of the current context."""
        context = contextvars.copy_context()
        return super().submit(context.run, fn, *args, **kwargs)
