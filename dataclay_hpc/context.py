"""The session a piece of work runs in: which client, user and dataset.

The session lives in a context variable, so it follows the work wherever the
context is copied: into ``contextvars.copy_context().run``, asyncio tasks,
``asyncio.to_thread`` and ``ContextThreadPoolExecutor``. Every request to a
backend carries the user and dataset, and the backend runs the request in that
session. A thread that never received a context falls back to the process's
default session: the first client started in the process (or the backend
itself, inside a backend).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .exceptions import DataClayException

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["ContextThreadPoolExecutor", "Session", "current_session"]

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
    """

    runtime: Runtime
    username: str = DEFAULT_USERNAME
    dataset: str = DEFAULT_DATASET


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
