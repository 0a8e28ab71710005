"""Requests from any process of a job (driver or backend) to the backends.

A ``Runtime`` knows the job's backends and its secret, keeps one connection per
backend and thread, and turns the object API (attribute reads and writes,
active-method calls, aliases, ...) into requests. A backend answers an object
that has moved with its new place; the runtime updates the proxy's
``_dc_meta.master_backend_id`` and asks again, so a stale location is repaired
on the fly.
"""

from __future__ import annotations

import atexit
import logging
import pickle
import random
import socket
import threading
import uuid
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from . import execution, serialization, transport
from .context import DEFAULT_DATASET, DEFAULT_USERNAME, Session, current_session
from .exceptions import (
    BackendDoesNotExistError,
    BackendUnavailableError,
    DataClayException,
    DatasetAccessError,
    ObjectDoesNotExistError,
    RemoteTraceback,
)
from .metadata import BackendInfo
from .object import DataClayObject, heap_add, heap_lookup, heap_remove
from .transport import Connection

__all__ = ["Runtime"]

logger = logging.getLogger(__name__)

_HOST = socket.gethostname()
# answers a backend sends back
OK, ERROR, MOVED, REDIRECTED = 0, 1, 2, 3
# what pickling raises for a value that cannot be pickled
_PICKLE_ERRORS = (pickle.PicklingError, TypeError, AttributeError)
# hops a request follows through "moved to" answers before giving up
_MAX_MOVED_HOPS = 16


class Runtime:
    """The backends of one job, and the requests a process can send them.

    Args:
        job_id: The job's id.
        secret: The job's secret.
        backends: Every backend of the job.

    Attributes:
        inside_job: Whether this runtime belongs to a backend: its requests
            come from code already running in the job, which backends do not
            check against datasets again.
    """

    inside_job = False

    def __init__(self, job_id: str, secret: bytes, backends: Sequence[BackendInfo]):
        self.job_id = job_id
        self._secret = secret
        ordered = sorted(backends, key=lambda info: info.rank)
        self.backends: dict[uuid.UUID, BackendInfo] = {b.id: b for b in ordered}
        self._backend_ids = [b.id for b in ordered]
        for backend_id in self._backend_ids:
            serialization.remember_uuid(backend_id)
        self._local = threading.local()
        self._connections_lock = threading.Lock()
        self._all_connections: list[Connection] = []
        self._backend_of: dict[Connection, uuid.UUID] = {}
        # backend -> this process's connection for arrivals to it (shared by
        # its threads), or None where it is not on this host
        self._arrivals: dict[uuid.UUID, Connection | None] = {}
        self._closed = False
        # (backend, username, dataset) -> classes that backend has stored
        # objects of for that session, from answered requests
        self._stored_classes: dict[tuple[uuid.UUID, str, str], set[type]] = {}
        # about no session: it only asks what the connection's stores did
        self._settle_message = (
            pickle.dumps(
                ("settle", DEFAULT_USERNAME, DEFAULT_DATASET, True, ()), protocol=5
            ),
            0,
            (),
        )
        self._failed_stores: list[DataClayException] = []
        self._settles_at_exit = False

    # -- plumbing --------------------------------------------------------------

    def backend_id(self, backend_id: uuid.UUID | str) -> uuid.UUID:
        """Return ``backend_id`` as a UUID of one of the job's backends.

        Raises:
            BackendDoesNotExistError: It is not one.
        """
        if not isinstance(backend_id, uuid.UUID):
            try:
                backend_id = uuid.UUID(str(backend_id))
            except ValueError:
                raise BackendDoesNotExistError(backend_id, self._backend_ids) from None
        if backend_id not in self.backends:
            raise BackendDoesNotExistError(backend_id, self._backend_ids)
        return backend_id

    def _connection(self, backend_id: uuid.UUID) -> Connection:
        connections = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        connection = connections.get(backend_id)
        if connection is None or connection.closed:
            connection = self._open(backend_id)
            connection.on_posted_handled = self._posts_handled
            self._backend_of[connection] = backend_id
            connections[backend_id] = connection
            with self._connections_lock:
                self._all_connections.append(connection)
        return connection

    def _open(
        self, backend_id: uuid.UUID, arrivals_from: bytes | None = None
    ) -> Connection:
        """Connect to a backend, over its Unix socket where it is on this host."""
        if self._closed:
            raise DataClayException(
                "the client is stopped; start a client before using objects"
            )
        info = self.backends[backend_id]
        return Connection(
            info.address,
            self._secret,
            f"backend rank {info.rank}",
            info.local_address if info.host == _HOST else None,
            arrivals_from=arrivals_from,
        )

    def arrivals_connection(
        self, backend_id: uuid.UUID, sender: uuid.UUID
    ) -> Connection | None:
        """Return this process's connection for arrivals to a backend.

        One for all threads, made on first use (and again after it failed)
        and tagged with ``sender`` (the backend this runtime belongs to).
        ``None`` where the backend is not reached over a Unix socket of this
        host: arrivals need the kernel to queue a message at the receiver
        before ``send`` returns.

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """
        try:
            connection = self._arrivals[backend_id]
        except KeyError:
            pass
        else:
            if connection is None or not connection.closed:
                return connection
        with self._connections_lock:
            connection = self._arrivals.get(backend_id)
            if backend_id in self._arrivals and (
                connection is None or not connection.closed
            ):
                return connection
            info = self.backends[backend_id]
            connection = None
            if info.host == _HOST and info.local_address is not None:
                connection = self._open(backend_id, arrivals_from=sender.bytes)
                if connection.local:
                    self._all_connections.append(connection)
                else:  # another network namespace: TCP after all
                    connection.close()
                    connection = None
            self._arrivals[backend_id] = connection
            return connection

    def request(
        self,
        backend_id: uuid.UUID,
        op: str,
        args: tuple,
        *,
        register: Callable[[DataClayObject], None] | None = None,
        session: Session | None = None,
        follow: Callable[[DataClayObject], bool] | None = None,
    ) -> Any:
        """Send one request to a backend and return its answer.

        Volatile objects reached by ``args`` are handed to ``register`` and travel
        with the request; they become proxies when it succeeds, and volatile again
        when it fails. Persistent objects for which ``follow`` returns true travel
        too, and become proxies here when it succeeds.
        """
        session = session or current_session()
        new_objects: list[DataClayObject] = []
        registered: list[DataClayObject] = []
        payload, count, buffers = self._pickle_request(
            op, args, session, register, follow, new_objects, registered
        )
        try:
            value = self.send(backend_id, payload, count, buffers)
        except BaseException:
            unregister(registered)
            raise
        if registered and not self.inside_job:
            key = (backend_id, session.username, session.dataset)
            self._stored_classes.setdefault(key, set()).update(map(type, registered))
        if len(new_objects) > serialization.GC_PAUSE_RECORDS:
            with serialization.paused_gc():
                _became_remote(new_objects)
        else:
            _became_remote(new_objects)
        return value

    def _pickle_request(
        self,
        op: str,
        args: tuple,
        session: Session,
        register: Callable[[DataClayObject], None] | None,
        follow: Callable[[DataClayObject], bool] | None,
        new_objects: list[DataClayObject],
        registered: list[DataClayObject],
    ) -> tuple[bytes, int, list[Any]]:
        """Pickle a request; on failure the objects it registered are volatile again."""
        message = (op, session.username, session.dataset, self.inside_job, args)
        try:
            if serialization.plain_arguments(args):
                # nothing persistent can hide in it: skip the job's pickler
                return pickle.dumps(message, protocol=5), 0, []
            return serialization.dumps(
                message, register, new_objects, follow=follow, registered=registered
            )
        except serialization.ClassImportError:
            unregister(registered)
            raise
        except _PICKLE_ERRORS as exc:
            unregister(registered)
            raise _unpicklable(op, exc) from exc
        except BaseException:
            unregister(registered)
            raise

    def send(
        self, backend_id: uuid.UUID, payload: bytes, count: int, buffers: Sequence[Any]
    ) -> Any:
        """Send a pickled request (from ``serialization.dumps``); return its answer.

        Raises:
            Exception: The backend's error, with its traceback as the cause.
        """
        connection = self._connection(backend_id)
        if _unsettled[0] or self._failed_stores:
            self.wait_for_stores()
        frame = connection.request(payload, count, buffers)
        (status, value), _ = serialization.loads(*frame)
        if status == OK:
            return value
        if status == MOVED:
            raise Moved(value)
        if status == REDIRECTED:
            raise Redirected(value)
        error, remote_tb, rank, host = value
        error.__cause__ = RemoteTraceback(
            f"raised on backend rank {rank} (host {host}):\n{remote_tb}"
        )
        raise error

    def wait_for_stores(self) -> None:
        """Return once the backends have taken every store this process posted.

        Covers the stores of every client of the process: an object made
        persistent through one client may be handed to a thread of another.

        Raises:
            DataClayException: A store posted through this runtime failed on
                its backend (each failure is raised once).
        """
        if _unsettled[0]:
            _settle_every_runtime()
        if self._failed_stores:
            try:
                failure = self._failed_stores.pop(0)
            except IndexError:  # another thread raised it
                return
            raise failure

    def _posts_handled(self, count: int) -> None:
        with _unsettled_lock:
            _unsettled[0] -= count

    def _settle(self) -> None:
        """Wait until the backends have taken every store this process posted.

        One ``settle`` request on each connection with posted stores: its
        answer comes after theirs were handled, and carries their errors. A
        thread covers its own posts this way before each of its requests, so
        posts are never left behind a long request of their thread.
        """
        with self._connections_lock:
            connections = [c for c in self._all_connections if c.posted]
        for connection in connections:
            backend_id = self._backend_of.get(connection)
            if backend_id is None:  # closed meanwhile
                continue
            try:
                frame = connection.settle(*self._settle_message)
            except BackendUnavailableError as exc:
                self._store_failed(backend_id, exc, lost_connection=True)
                continue
            if frame is None:  # its owner had them covered
                continue
            (_, failures), _ = serialization.loads(*frame)
            for error, _text, _rank, _host in failures:
                self._store_failed(backend_id, error)

    def _store_failed(
        self, backend_id: uuid.UUID, error: BaseException, lost_connection: bool = False
    ) -> None:
        rank = self.backends[backend_id].rank
        if lost_connection:
            text = (
                f"objects made persistent on backend rank {rank} may not have been "
                f"stored: the connection failed before the backend confirmed them "
                f"({error}); check the job's log for that rank"
            )
        else:
            text = (
                f"a make_persistent sent to backend rank {rank} failed after the "
                f"call had returned: {error}; that object was not stored: make it "
                "persistent again"
            )
        failure = DataClayException(text)
        failure.__cause__ = error
        logger.error("%s", failure)
        self._failed_stores.append(failure)

    def _post_store(
        self, obj: DataClayObject, target: uuid.UUID, session: Session
    ) -> bool:
        """Send ``make_persistent`` of ``obj`` without waiting for the answer.

        Only when nothing the request carries can fail on ``target``: the
        backend has stored objects of every class in it for this session
        before, and every value is a plain one (numbers, strings, containers
        of them, numpy arrays, objects). The next request of this process, from
        any thread, first waits until the backends have taken every posted
        store, and raises the error of one that failed. Returns whether it was
        sent.
        """
        stored = self._stored_classes.get((target, session.username, session.dataset))
        if not transport.MAX_POSTED or not stored:
            return False
        graph = _plain_graph(obj, stored)
        if graph is _NOT_PLAIN:
            return False
        connection = self._connection(target)
        if connection.posted >= transport.MAX_POSTED:
            return False  # this one waits, and covers those before it
        new_objects: list[DataClayObject] = []
        registered: list[DataClayObject] = []
        if graph is _ALONE:
            # no other object in it: the state travels as a plain pickle
            self._register_for(target, session)(obj)
            new_objects.append(obj)
            registered.append(obj)
            try:
                payload, buffers = serialization.dumps_store(
                    obj, session.username, session.dataset, self.inside_job
                )
            except BaseException:
                unregister(registered)
                raise
            count = 0
        else:
            payload, count, buffers = self._pickle_request(
                "make_persistent",
                (obj, None),
                session,
                self._register_for(target, session),
                None,
                new_objects,
                registered,
            )
        if not self._settles_at_exit:
            _settle_at_exit(self)
            self._settles_at_exit = True
        with _unsettled_lock:
            _unsettled[0] += 1
        try:
            connection.post(payload, count, buffers)
        except BaseException:
            with _unsettled_lock:
                _unsettled[0] -= 1
            unregister(registered)
            raise
        _became_remote(new_objects)
        return True

    def object_request(self, obj: DataClayObject, op: str, *args: Any) -> Any:
        """Send a request about ``obj`` to its backend.

        Follows moves (updating ``_dc_meta.master_backend_id``) and consolidated
        versions (the request goes to the original instead).
        """
        target = obj
        by_id = serialization.plain_arguments(args)
        for _ in range(_MAX_MOVED_HOPS):
            meta = target._dc_meta
            backend_id = meta.master_backend_id
            if backend_id is None:
                backend_id = meta.master_backend_id = self._locate(meta.id)
            try:
                if by_id:
                    return self._request_by_id(backend_id, op, target, args)
                return self.request(
                    backend_id,
                    op,
                    (target, *args),
                    register=self._register_for(backend_id),
                )
            except Moved as moved:
                logger.debug("object %s moved to %s", meta.id, moved.backend_id)
                meta.master_backend_id = moved.backend_id
            except Redirected as redirected:
                logger.debug(
                    "version %s was consolidated into %s", meta.id, redirected.original
                )
                target = redirected.original
        raise ObjectDoesNotExistError(
            obj._dc_meta.id, f"it was still moving after {_MAX_MOVED_HOPS} hops"
        )

    def _request_by_id(
        self, backend_id: uuid.UUID, op: str, obj: DataClayObject, args: tuple
    ) -> Any:
        """Send a request about ``obj`` whose other arguments are plain values.

        The object goes as its id, class path and dataset, and the whole
        message as one plain pickle: a third of the time of the job's
        pickler, on both sides, for the requests most calls make (reads,
        writes of plain values, active methods with plain arguments, moves).
        The class goes by its path, which costs half as much as the class
        itself to pickle and unpickle; a backend imports it only if it does
        not hold the object.
        """
        session = current_session()
        meta = obj.__dict__["_dc_meta"]
        message = (
            op,
            session.username,
            session.dataset,
            self.inside_job,
            args,
            meta.id.int,
            meta.class_name,
            meta.dataset_name,
        )
        try:
            payload = pickle.dumps(message, protocol=5)
        except _PICKLE_ERRORS as exc:
            raise _unpicklable(op, exc) from exc
        return self.send(backend_id, payload, 0, ())

    def _register_for(
        self, backend_id: uuid.UUID, session: Session | None = None
    ) -> Callable[[DataClayObject], None]:
        def register(obj: DataClayObject) -> None:
            meta = obj._dc_meta
            meta.master_backend_id = backend_id
            if meta.dataset_name is None:
                meta.dataset_name = (session or current_session()).dataset
            obj.__dict__["_dc_is_registered"] = True
            # before the request: an answer that refers to it must find it
            heap_add(obj)

        return register

    def alias_home(self, dataset: str, alias: str) -> uuid.UUID:
        """Return the backend that keeps ``dataset/alias``."""
        key = zlib.crc32(f"{dataset}\0{alias}".encode())
        return self._backend_ids[key % len(self._backend_ids)]

    def dataset_home(self, dataset: str) -> uuid.UUID:
        """Return the backend that knows who owns ``dataset``."""
        return self._backend_ids[zlib.crc32(dataset.encode()) % len(self._backend_ids)]

    def open_dataset(
        self, username: str, dataset: str, session: Session | None = None
    ) -> None:
        """Check that ``username`` may open a session on ``dataset``.

        A dataset nobody has used yet becomes ``username``'s.

        Raises:
            DatasetAccessError: ``dataset`` belongs to another user.
        """
        owner = self.request(
            self.dataset_home(dataset),
            "dataset_owner",
            (dataset, username),
            session=session,
        )
        if owner != username:
            raise DatasetAccessError(None, dataset, dataset, username, owner, False)

    def broadcast(self, op: str, args: tuple = ()) -> list[Any]:
        """Send the same request to every backend, in rank order."""
        return [self.request(b, op, args) for b in self._backend_ids]

    def close(self) -> None:
        """Wait until posted stores are taken; close every connection.

        Stores that failed were logged as errors when their failure came back.
        """
        try:
            self._settle()
        except DataClayException as exc:
            logger.error("stores posted by this process may be lost: %s", exc)
        self._failed_stores.clear()
        self._closed = True
        with self._connections_lock:
            connections, self._all_connections = self._all_connections, []
            self._backend_of.clear()
            self._arrivals.clear()
        for connection in connections:
            connection.close()

    # -- the object API ------------------------------------------------------------

    def make_persistent(
        self, obj: DataClayObject, alias: str | None, backend_id: uuid.UUID | str | None
    ) -> None:
        """Store a volatile object (and what it reaches) on one backend."""
        session = current_session()
        if backend_id is None:
            target = random.choice(self._backend_ids)
        else:
            target = self.backend_id(backend_id)
        home = target if alias is None else self.alias_home(session.dataset, alias)
        if alias is not None and home != target:
            # reserve the alias first: a taken alias leaves nothing behind
            meta = obj.__dict__["_dc_meta"]
            reservation = (session.dataset, alias, meta.id, type(obj), target)
            self.request(home, "add_alias", reservation)
            try:
                self.request(
                    target,
                    "make_persistent",
                    (obj, None),
                    register=self._register_for(target, session),
                )
            except BaseException:
                self.request(home, "delete_alias", (session.dataset, alias))
                raise
        elif (
            alias is not None
            or self.inside_job
            or not self._post_store(obj, target, session)
        ):
            self.request(
                target,
                "make_persistent",
                (obj, alias),
                register=self._register_for(target, session),
            )

    def get_attribute(self, obj: DataClayObject, name: str) -> Any:
        """Read a persistent attribute of a remote object."""
        return self.object_request(obj, "get_attribute", name)

    def set_attribute(self, obj: DataClayObject, name: str, value: Any) -> None:
        """Write a persistent attribute of a remote object."""
        self.object_request(obj, "set_attribute", name, value)

    def delete_attribute(self, obj: DataClayObject, name: str) -> None:
        """Delete a persistent attribute of a remote object."""
        self.object_request(obj, "delete_attribute", name)

    def call_active_method(
        self, obj: DataClayObject, name: str, args: tuple, kwargs: dict
    ) -> Any:
        """Run an active method on the object's backend.

        The execution constraints of the running context travel with the call.
        """
        limits = execution.current_constraints()
        if limits == execution.NO_CONSTRAINTS:
            return self.object_request(obj, "call", name, args, kwargs)
        return self.object_request(obj, "call", name, args, kwargs, limits)

    def get_by_alias(self, alias: str, dataset_name: str | None) -> Any:
        """Return the object registered under ``alias``."""
        session = current_session()
        dataset = dataset_name or session.dataset
        return self.request(
            self.alias_home(dataset, alias),
            "get_alias",
            (dataset, alias),
            session=session,
        )

    def add_alias(self, obj: DataClayObject, alias: str) -> None:
        """Register ``alias`` for a persistent object."""
        meta = obj._dc_meta
        dataset = meta.dataset_name or current_session().dataset
        self.request(
            self.alias_home(dataset, alias),
            "add_alias",
            (dataset, alias, meta.id, type(obj), meta.master_backend_id),
        )

    def delete_alias(self, alias: str, dataset_name: str | None) -> None:
        """Remove an alias."""
        dataset = dataset_name or current_session().dataset
        self.request(self.alias_home(dataset, alias), "delete_alias", (dataset, alias))

    def get_aliases(self, obj: DataClayObject) -> set[str]:
        """Return every alias of ``obj`` in its dataset."""
        meta = obj._dc_meta
        found: set[str] = set()
        for aliases in self.broadcast("aliases_of", (meta.id, meta.dataset_name)):
            found.update(aliases)
        return found

    def get_by_id(self, object_id: uuid.UUID | str) -> Any:
        """Return the object with ``object_id``."""
        if not isinstance(object_id, uuid.UUID):
            try:
                object_id = uuid.UUID(str(object_id))
            except ValueError:
                raise ObjectDoesNotExistError(
                    object_id, "it is not a valid object id"
                ) from None
        obj = heap_lookup(object_id)
        if obj is not None:
            return obj
        for found in self.broadcast("get_object", (object_id,)):
            if found is not None:
                return found
        raise ObjectDoesNotExistError(
            object_id, f"none of the job's {len(self.backends)} backends holds it"
        )

    def _locate(self, object_id: uuid.UUID) -> uuid.UUID:
        for found in self.broadcast("locate", (object_id,)):
            if found is not None:
                return found
        raise ObjectDoesNotExistError(
            object_id, f"none of the job's {len(self.backends)} backends holds it"
        )

    def sync(self, obj: DataClayObject) -> None:
        """Refresh ``obj._dc_meta`` from its backend."""
        meta = self.object_request(obj, "metadata")
        if meta.id == obj._dc_meta.id:  # not the original of a consolidated version
            obj.__dict__["_dc_meta"] = meta

    def move(
        self,
        obj: DataClayObject,
        backend_id: uuid.UUID | str,
        recursive: bool,
        remotes: bool,
    ) -> None:
        """Move a persistent object to another backend."""
        target = self.backend_id(backend_id)
        # an integer costs a few microseconds less than a UUID, each way
        self.object_request(obj, "move", target.int, recursive, remotes)
        obj._dc_meta.master_backend_id = target

    def new_version(
        self, obj: DataClayObject, backend_id: uuid.UUID | str | None
    ) -> DataClayObject:
        """Make a version of ``obj`` on ``backend_id`` (default: obj's backend)."""
        target = None if backend_id is None else self.backend_id(backend_id)
        version, meta = self.object_request(obj, "new_version", target)
        version.__dict__["_dc_meta"] = meta  # the lineage, not just a reference
        return version

    def consolidate_version(self, version: DataClayObject, check: bool) -> None:
        """Write a version's state into its original."""
        self.object_request(version, "consolidate_version", check)

    def discard_version(self, version: DataClayObject) -> None:
        """Throw a version away without consolidating it."""
        self.object_request(version, "discard_version")

    def flush_all(self) -> int:
        """Make every backend write its objects to its store and drop them."""
        return sum(self.broadcast("flush"))


class Redirected(Exception):
    """The object is a consolidated version: ask its original instead.

    A backend raises it to answer ``REDIRECTED``; ``send`` raises it again on
    the caller's side.
    """

    def __init__(self, original: DataClayObject) -> None:
        super().__init__(original)
        self.original = original


class Moved(Exception):
    """The object lives on another backend now (answer ``MOVED``)."""

    def __init__(self, backend_id: uuid.UUID) -> None:
        super().__init__(backend_id)
        self.backend_id = backend_id


def unregister(objects: list[DataClayObject]) -> None:
    """Make objects registered for a request that failed volatile again."""
    for obj in objects:
        heap_remove(obj)
        state = obj.__dict__
        state["_dc_is_registered"] = False
        state["_dc_meta"].master_backend_id = None


def _unpicklable(op: str, exc: BaseException) -> DataClayException:
    return DataClayException(
        f"cannot send {op} request: a value cannot be pickled ({exc}); "
        "persistent attributes and arguments must be picklable"
    )


def _became_remote(objects: list[DataClayObject]) -> None:
    for obj in objects:
        obj._dc_drop_state()
        state = obj.__dict__
        state["_dc_is_local"] = False
        state["_dc_is_loaded"] = False


# how many values a store may carry and still be posted without its answer
_PLAIN_GRAPH_VALUES = 256
_CONTAINERS = frozenset({list, tuple, set, frozenset})
# what _plain_graph finds
_NOT_PLAIN, _ALONE, _WITH_OBJECTS = "not plain", "alone", "with objects"


def _plain_graph(obj: DataClayObject, stored: set[type]) -> str:
    """Say whether ``obj`` and the volatile objects it reaches hold plain values.

    Plain: the types of ``serialization.PLAIN_TYPES``, lists, tuples, sets and
    dicts of them, numpy arrays without Python objects, and objects of the
    classes in ``stored``, without ``__getstate__``/``__setstate__`` of their
    own. A backend that stored these classes before cannot fail to build such
    a state.

    Returns:
        ``_NOT_PLAIN``; ``_ALONE`` when plain and ``obj`` is the only object
        in it; ``_WITH_OBJECTS`` when plain and other objects are reached.
    """
    plain = serialization.PLAIN_TYPES
    budget = _PLAIN_GRAPH_VALUES
    seen: set[int] = set()
    pending: list[Any] = [obj]
    objects = -1
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind in plain:
            continue
        budget -= 1
        if budget < 0:
            return _NOT_PLAIN
        if kind in _CONTAINERS:
            pending.extend(value)
        elif kind is dict:
            pending.extend(value.keys())
            pending.extend(value.values())
        elif kind.__name__ == "ndarray" and kind.__module__ == "numpy":
            if value.dtype.hasobject:
                return _NOT_PLAIN
        elif isinstance(value, DataClayObject):
            if kind not in stored:
                return _NOT_PLAIN
            objects += 1
            state = value.__dict__
            if state["_dc_is_registered"] or id(value) in seen:
                continue
            if kind._dc_getstate is not None or kind._dc_setstate is not None:
                return _NOT_PLAIN
            seen.add(id(value))
            pending.extend(state[name] for name in kind._dc_properties if name in state)
        else:
            return _NOT_PLAIN
    return _ALONE if objects == 0 else _WITH_OBJECTS


# every runtime of this process that has posted stores
_runtimes_to_settle: weakref.WeakSet[Runtime] = weakref.WeakSet()
# stores posted and not yet covered by an answer, over every runtime of the
# process (one cell, changed under the lock)
_unsettled = [0]
_unsettled_lock = threading.Lock()


def _settle_at_exit(runtime: Runtime) -> None:
    # registered on the first post, after the embedded job's own exit hook,
    # so it runs before that hook stops the backends
    with _unsettled_lock:
        if not _runtimes_to_settle:
            atexit.register(_settle_all)
        _runtimes_to_settle.add(runtime)


def _settle_every_runtime() -> None:
    with _unsettled_lock:
        runtimes = list(_runtimes_to_settle)
    for runtime in runtimes:
        if not runtime._closed:
            runtime._settle()


def _settle_all() -> None:
    try:
        _settle_every_runtime()
    except DataClayException as exc:
        logger.error("stores posted by this process were lost: %s", exc)
