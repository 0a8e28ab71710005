"""A backend: holds objects and serves requests about them.

Each backend rank keeps its objects in memory (``objects``: id to object), the
aliases that hash to it, and a forwarding entry for every object that moved
away. One ``RequestServer`` thread per connection answers attribute reads and
writes, active-method calls, alias look-ups and moves; ``async def`` active
methods run on the backend's event loop. ``flush`` writes every object to the
backend's HDF5 store and drops its state; the next access reloads it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import inspect
import logging
import os
import pickle
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from . import execution, serialization
from .context import (
    DEFAULT_DATASET,
    DEFAULT_USERNAME,
    Session,
    current_session,
    reset_session,
    session_or_none,
    set_default_session,
    set_session,
)
from .exceptions import (
    AliasAlreadyExistError,
    AliasDoesNotExistError,
    BackendUnavailableError,
    DataClayException,
    DatasetAccessError,
    ObjectDoesNotExistError,
    ObjectIsNotVersionError,
    VersionConflictError,
)
from .metadata import BackendInfo, ObjectMetadata, fast_uuid, new_object_id
from .object import (
    DataClayObject,
    heap_add,
    heap_get_or_create,
    heap_lookup,
    set_process_backend,
)
from .runtime import (
    ERROR,
    MOVED,
    OK,
    REDIRECTED,
    Moved,
    Redirected,
    Runtime,
    unregister,
)
from .store import Store
from .transport import REQUEST_TIMEOUT_S, RequestServer

__all__ = ["Backend"]

logger = logging.getLogger(__name__)

# records per message of a recursive move: small enough that pickling the
# next chunk overlaps with the target rebuilding this one
SHIP_CHUNK_RECORDS = 10_000
# fields of a request that names its object by id (Runtime._request_by_id):
# op, username, dataset, inside_job, args, object id, class, dataset of the object
_BY_ID = 8
# answers the plain pickler writes as they are
_PLAIN_REPLY_TYPES = serialization.PLAIN_VALUE_TYPES | {serialization.Reference}
# a flush waits at most this long for the requests in flight to finish
FLUSH_WAIT_S = 600.0
# Objects a backend receives live as long as it holds them, yet the cyclic
# garbage collector would scan each of them again and again as the heap grows
# (a quarter of the time a backend took to take in 100 000 moved objects).
# After this many new objects, gc.freeze() takes everything alive out of later
# scans (a recursive move of 100 000 objects went from 2.5-2.8 s to 1.9-2.1 s;
# a collection before each freeze cost 45 ms and found nothing). Reference counting
# still frees frozen objects; what stays in memory is cyclic garbage that
# existed, uncollected, at a freeze, or a cycle of frozen objects that becomes
# garbage later.
FREEZE_AFTER_OBJECTS = 10_000


class _RequestGate:
    """Lets requests run together, and a flush run alone.

    Requests never wait for each other (an active method may call back into
    its own backend), so a flush waits until no request is in flight and holds
    new ones until it is done.
    """

    def __init__(self) -> None:
        # a plain lock on the way in and out (its ``with`` costs no Python
        # call); the condition only where someone has to wait
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = 0
        self._flushing = False

    def enter(self) -> None:
        with self._lock:
            if not self._flushing:
                self._running += 1
                return
        with self._idle:
            while self._flushing:
                self._idle.wait()
            self._running += 1

    def leave(self) -> None:
        with self._lock:
            self._running -= 1
            if self._flushing and self._running == 0:
                self._idle.notify_all()

    def enter_alone(self, timeout_s: float) -> None:
        with self._idle:
            if not self._idle.wait_for(
                lambda: not self._flushing and self._running == 0, timeout_s
            ):
                raise DataClayException(
                    f"flush waited {timeout_s:.0f} s for {self._running} requests in "
                    "flight to finish; retry once the running active methods are done"
                )
            self._flushing = True

    def leave_alone(self) -> None:
        with self._idle:
            self._flushing = False
            self._idle.notify_all()


class Backend:
    """One backend rank.

    Args:
        rank: The MPI rank.
        secret: The job's secret.
        storage_dir: Folder of the job's store; the backend's file is
            ``backend-<rank>.h5`` in it.
        bind_host: Address the request server binds.
        advertise_host: Address other ranks reach it at.
    """

    def __init__(
        self,
        rank: int,
        secret: bytes,
        storage_dir: str,
        bind_host: str,
        advertise_host: str,
    ) -> None:
        self.backend_id = uuid.uuid4()
        self.rank = rank
        self.host = socket.gethostname()
        self.storage_path = os.path.join(storage_dir, f"backend-{rank}.h5")
        self.objects: dict[uuid.UUID, DataClayObject] = {}
        self.aliases: dict[tuple[str, str], tuple[uuid.UUID, type, uuid.UUID]] = {}
        self.moved: dict[uuid.UUID, uuid.UUID] = {}
        # backend -> classes of objects it has taken from here as plain stores
        self._stored_at: dict[uuid.UUID, set[type]] = {}
        # consolidated versions: id -> the original, which requests go to
        self.consolidated: dict[uuid.UUID, DataClayObject] = {}
        self.discarded: set[uuid.UUID] = set()
        # how many consolidations each original here has taken
        self._consolidations: dict[uuid.UUID, int] = {}
        self._version_lock = threading.Lock()
        self.runtime: Runtime | None = None
        self.stopped = threading.Event()
        self._aliases_lock = threading.Lock()
        self._load_lock = threading.RLock()
        self._gate = _RequestGate()
        self._store: Store | None = None
        self._sessions: dict[tuple[str, str, bool], Session] = {}
        # dataset -> the user it belongs to: every dataset this backend has
        # checked, and the datasets whose home it is (Runtime.dataset_home)
        self._owners: dict[str, str] = {DEFAULT_DATASET: DEFAULT_USERNAME}
        self._owners_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._shipper: concurrent.futures.ThreadPoolExecutor | None = None
        # objects received since the last gc.freeze()
        self._unfrozen = 0
        # per connection thread: errors of posted requests not reported yet
        self._connection_state = threading.local()
        self._ops: dict[str, Callable[..., Any]] = {
            name[4:]: getattr(self, name)
            for name in dir(self)
            if name.startswith("_op_")
        }
        self.server = RequestServer(
            self.handle,
            secret,
            bind_host,
            f"backend-{rank}",
            local_address=f"dataclay-hpc-{self.backend_id}",
            arrival_handler=self._take_arrival,
        )
        self.info = BackendInfo(
            id=self.backend_id,
            rank=rank,
            host=self.host,
            address=(advertise_host, self.server.address[1]),
            pid=os.getpid(),
            local_address=self.server.local_address,
        )

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start serving requests; this process is the backend from now on."""
        set_process_backend(self)
        self.server.start()
        logger.info(
            "backend rank %d ready: id %s, listening on %s:%d",
            self.rank,
            self.backend_id,
            *self.info.address,
        )

    def attach(self, runtime: Runtime) -> None:
        """Give the backend its view of the whole job (after the address exchange)."""
        self.runtime = runtime
        runtime.inside_job = True
        set_default_session(Session(runtime, inside_job=True), replace=True)

    def close(self) -> None:
        """Stop serving and close the store."""
        self.server.close()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._shipper is not None:
            self._shipper.shutdown(wait=False, cancel_futures=True)
        if self.runtime is not None:
            self.runtime.close()
        if self._store is not None:
            self._store.close()
        set_process_backend(None)
        logger.info(
            "backend rank %d stopped (%d objects)", self.rank, len(self.objects)
        )

    # -- objects -------------------------------------------------------------------

    def register_new(self, obj: DataClayObject) -> None:
        """Make an object created in this backend persistent here."""
        state = obj.__dict__
        meta = state["_dc_meta"]
        meta.master_backend_id = self.backend_id
        if meta.dataset_name is None:
            session = session_or_none()
            meta.dataset_name = session.dataset if session else DEFAULT_DATASET
        state["_dc_is_registered"] = True
        state["_dc_is_local"] = True
        state["_dc_is_loaded"] = True
        self.objects[meta.id] = obj

    def load(self, obj: DataClayObject) -> None:
        """Read a flushed object's state back from the store."""
        with self._load_lock:
            state = obj.__dict__
            if state["_dc_is_loaded"]:
                return
            object_id = state["_dc_meta"].id
            saved = self._open_store().read(object_id)
            state["_dc_is_loaded"] = True
            obj._dc_set_state(saved)
            logger.debug("object %s reloaded from the store", object_id)

    def _open_store(self) -> Store:
        if self._store is None:
            with self._load_lock:
                if self._store is None:
                    self._store = Store(self.storage_path, self.register_new)
        return self._store

    def _held(self, obj: DataClayObject) -> DataClayObject:
        state = obj.__dict__
        if state["_dc_is_local"] and state["_dc_is_registered"]:
            return obj
        object_id = state["_dc_meta"].id
        self.server.take_arrivals()
        if state["_dc_is_local"] and state["_dc_is_registered"]:
            return obj  # it was on its way here
        if object_id in self.moved:
            raise Moved(self.moved[object_id])
        if object_id in self.consolidated:
            raise Redirected(self.consolidated[object_id])
        if object_id in self.discarded:
            raise ObjectDoesNotExistError(
                object_id, "it was a version and was discarded"
            )
        raise ObjectDoesNotExistError(
            object_id, f"backend rank {self.rank} does not hold it"
        )

    def _materialize(self, records: list[serialization.Record]) -> None:
        if not records:
            return
        if len(records) > serialization.GC_PAUSE_RECORDS:
            with serialization.paused_gc():
                self._materialize_records(records)
        else:
            self._materialize_records(records)
        self._unfrozen += len(records)
        if self._unfrozen >= FREEZE_AFTER_OBJECTS:
            self._unfrozen = 0
            gc.freeze()

    def _materialize_records(self, records: list[serialization.Record]) -> None:
        done: list[DataClayObject] = []
        backend_id = self.backend_id
        moved = self.moved
        try:
            for cls, meta, state in records:
                object_id = meta.id
                obj = heap_get_or_create(object_id, cls, backend_id)
                meta.master_backend_id = backend_id
                obj.__dict__.update(
                    _dc_meta=meta,
                    _dc_is_registered=True,
                    _dc_is_local=True,
                    _dc_is_loaded=True,
                )
                done.append(obj)
                obj._dc_set_state(state)
                self.objects[object_id] = obj
                if moved:
                    moved.pop(object_id, None)
        except BaseException:
            for obj in done:
                self.objects.pop(obj._dc_meta.id, None)
                obj._dc_drop_state()
                obj.__dict__.update(_dc_is_local=False, _dc_is_loaded=False)
            raise

    def _add_alias(
        self, dataset: str, alias: str, entry: tuple[uuid.UUID, type, uuid.UUID]
    ) -> None:
        with self._aliases_lock:
            if (dataset, alias) in self.aliases:
                raise AliasAlreadyExistError(alias, dataset)
            self.aliases[(dataset, alias)] = entry

    # -- requests ------------------------------------------------------------------

    def handle(
        self, payload: bytes, count: int, buffers: list[Any], answer_wanted: bool
    ):
        """Answer one request frame with a reply frame.

        A posted request (``answer_wanted`` false) gets no reply; when it
        fails, its error waits for the ``settle`` request of the same
        connection (each connection is served by one thread).
        """
        if count > serialization.GC_PAUSE_RECORDS:
            with serialization.paused_gc():
                return self._handle(payload, count, buffers, answer_wanted)
        return self._handle(payload, count, buffers, answer_wanted)

    def _handle(
        self, payload: bytes, count: int, buffers: list[Any], answer_wanted: bool
    ):
        op = "?"
        try:
            message, records = serialization.loads(payload, count, buffers)
            if len(message) == _BY_ID:
                op, username, dataset, inside_job, args = message[:5]
                args = (self._object(*message[5:]), *args)
            else:
                op, username, dataset, inside_job, args = message
            try:
                handler = self._ops[op]
            except KeyError:
                raise DataClayException(
                    f"backend rank {self.rank}: unknown request {op!r}"
                ) from None
            logger.debug("request %s from %s/%s", op, username, dataset)
            token = set_session(self._session(username, dataset, inside_job))
            try:
                if op == "flush":
                    result = handler(records, *args)
                else:
                    self._gate.enter()
                    try:
                        result = handler(records, *args)
                    finally:
                        self._gate.leave()
            finally:
                reset_session(token)
            reply: tuple[int, Any] = (OK, result)
        except Moved as moved:
            reply = (MOVED, moved.backend_id)
        except Redirected as redirect:
            reply = (REDIRECTED, redirect.original)
        except BaseException as exc:  # noqa: BLE001 - every error goes back to the caller
            reply = self._error_reply(exc)
        if not answer_wanted:
            if reply[0] != OK:
                logger.debug("posted request %s failed: %s", op, reply[1][0])
                self._posted_failures().append(reply[1])
            return None
        return self._dump_reply(op, reply)

    def _object(
        self, object_id: int, class_path: str, dataset: str | None
    ) -> DataClayObject:
        """Return this process's object for a request that names it by id."""
        key = fast_uuid(object_id)
        obj = self.objects.get(key)
        if obj is not None:
            return obj
        if self.server.take_arrivals():  # it may have been on its way here
            obj = self.objects.get(key)
            if obj is not None:
                return obj
        # not held here: the handler says where it went, as for a reference
        cls = serialization.class_from_path(class_path)
        return heap_get_or_create(key, cls, self.backend_id, dataset)

    def _posted_failures(self) -> list[tuple[BaseException, str, int, str]]:
        # the connection's thread: one list per connection
        failures = getattr(self._connection_state, "failures", None)
        if failures is None:
            failures = self._connection_state.failures = []
        return failures

    def _op_settle(self, records: list) -> list[tuple[BaseException, str, int, str]]:
        """Return, and forget, the errors of requests posted on this connection."""
        failures = self._posted_failures()
        taken = failures[:]
        failures.clear()
        return taken

    def _error_reply(self, exc: BaseException) -> tuple[int, Any]:
        text = "".join(traceback.format_exception(exc))
        return ERROR, (exc, text, self.rank, self.host)

    def _dump_reply(self, op: str, reply: tuple[int, Any]):
        if type(reply[1]) in _PLAIN_REPLY_TYPES:  # no object in it
            return pickle.dumps(reply, protocol=5), 0, ()
        try:
            return serialization.dumps(reply, self.register_new, ship=False)
        except Exception as exc:  # noqa: BLE001
            if reply[0] == ERROR:
                original, text = reply[1][0], reply[1][1]
                substitute = DataClayException(f"{type(original).__name__}: {original}")
                reply = (ERROR, (substitute, text, self.rank, self.host))
            else:
                reply = self._error_reply(
                    DataClayException(
                        f"the result of {op} cannot be sent back ({exc}); return "
                        "picklable values from active methods"
                    )
                )
            return serialization.dumps(reply, self.register_new, ship=False)

    def _session(self, username: str, dataset: str, inside_job: bool) -> Session:
        key = (username, dataset, inside_job)
        session = self._sessions.get(key)
        if session is None:
            assert self.runtime is not None
            if not inside_job:
                owner = self._owner(dataset, claim_for=username)
                if owner != username:
                    raise DatasetAccessError(
                        None, dataset, dataset, username, owner, False
                    )
            session = Session(self.runtime, username, dataset, inside_job)
            self._sessions[key] = session
        return session

    # -- datasets ----------------------------------------------------------------------

    def _owner(self, dataset: str, claim_for: str | None = None) -> str | None:
        """Return who owns ``dataset``; ``claim_for`` takes it if nobody does."""
        owner = self._owners.get(dataset)
        if owner is not None:
            return owner
        assert self.runtime is not None
        home = self.runtime.dataset_home(dataset)
        if home == self.backend_id:
            return self._op_dataset_owner([], dataset, claim_for)
        owner = self.runtime.request(
            home, "dataset_owner", (dataset, claim_for), session=self._job_session()
        )
        if owner is not None:
            with self._owners_lock:
                self._owners.setdefault(dataset, owner)
        return owner

    def _op_dataset_owner(
        self, records: list, dataset: str, claim_for: str | None
    ) -> str | None:
        with self._owners_lock:
            if claim_for is None:
                return self._owners.get(dataset)
            owner = self._owners.setdefault(dataset, claim_for)
        if owner == claim_for:
            logger.debug("dataset %r belongs to user %r", dataset, owner)
        return owner

    def _job_session(self) -> Session:
        assert self.runtime is not None
        return Session(self.runtime, inside_job=True)

    def _reach(self, obj: DataClayObject, write: bool) -> DataClayObject:
        """Return the held object, if the request's session may reach it."""
        obj = self._held(obj)
        session = session_or_none()
        if session is None or session.inside_job:
            return obj
        dataset = obj.__dict__["_dc_meta"].dataset_name
        if dataset == session.dataset or dataset is None:
            return obj
        owner = self._owner(dataset)
        if write or owner != session.username:
            raise DatasetAccessError(
                f"object {obj._dc_meta.id}",
                dataset,
                session.dataset,
                session.username,
                owner,
                write,
            )
        return obj

    def _check_dataset(self, dataset: str, what: str, write: bool) -> None:
        """Allow a request naming ``dataset`` if the session's user owns it."""
        session = session_or_none()
        if session is None or session.inside_job or dataset == session.dataset:
            return
        owner = self._owner(dataset)
        if owner is not None and owner != session.username:  # unowned: empty
            raise DatasetAccessError(
                what,
                dataset,
                session.dataset,
                session.username,
                owner,
                write,
            )

    def _run_coroutine(self, coroutine: Any) -> Any:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever,
                    name=f"backend-{self.rank}-loop",
                    daemon=True,
                ).start()
                self._loop = loop
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=REQUEST_TIMEOUT_S)

    # -- request handlers: _op_<name>(records, *args) ----------------------------------

    def _op_ping(self, records: list) -> BackendInfo:
        return self.info

    def _op_make_persistent(
        self, records: list, obj: DataClayObject, alias: str | None
    ) -> None:
        object_id = obj._dc_meta.id
        if alias is not None:
            dataset = next(m.dataset_name for _, m, _ in records if m.id == object_id)
            self._add_alias(dataset, alias, (object_id, type(obj), self.backend_id))
        try:
            self._materialize(records)
        except BaseException:
            if alias is not None:
                with self._aliases_lock:
                    self.aliases.pop((dataset, alias), None)
            raise

    def _op_store(
        self, records: list, cls: type, meta: ObjectMetadata, state: dict[str, Any]
    ) -> None:
        """Take one new object sent as a plain state (no other object in it)."""
        self._materialize([(cls, meta, state)])

    def _take_arrival(
        self, sender: bytes, payload: bytes, count: int, buffers: list[Any]
    ) -> None:
        """Take one object a move sent here without waiting (``_ship_early``).

        The message is a plain ``store``. Should the object fail to arrive
        here (this backend runs out of memory), it goes back to ``sender``,
        and requests that come here for it are sent there.
        """
        try:
            self._gate.enter()
            try:
                self._take_store(payload, count, buffers)
            finally:
                self._gate.leave()
        except BaseException as exc:  # noqa: BLE001 - nothing may be lost
            self._send_back(uuid.UUID(bytes=sender), payload, buffers, exc)

    def _send_back(
        self,
        sender: uuid.UUID,
        payload: bytes,
        buffers: list[Any],
        error: BaseException,
    ) -> None:
        assert self.runtime is not None
        try:
            object_id = self.runtime.request(
                sender, "take_back", (payload, [bytes(b) for b in buffers])
            )
        except BaseException as exc:  # noqa: BLE001 - logged: its sender is gone
            logger.error(
                "backend rank %d failed to take an object backend %s moved here "
                "(%r), and could not send it back (%r): it is lost",
                self.rank,
                sender,
                error,
                exc,
            )
            return
        self.moved[object_id] = sender
        logger.error(
            "backend rank %d failed to take object %s, moved here from backend %s; "
            "it went back there: %r",
            self.rank,
            object_id,
            sender,
            error,
        )

    def _op_take_back(
        self, records: list, payload: bytes, buffers: list[bytes]
    ) -> uuid.UUID:
        """Hold again an object sent ahead from here that its target failed to take."""
        return self._take_store(payload, 0, buffers)

    def _take_store(self, payload: bytes, count: int, buffers: list[Any]) -> uuid.UUID:
        """Hold the object of a pickled ``store`` message; return its id."""
        message, _ = serialization.loads(payload, count, buffers)
        record = message[4]
        self._materialize([record])
        return record[1].id

    def _op_receive_objects(self, records: list, roots: list) -> None:
        self._materialize(records)

    def _op_get_attribute(self, records: list, obj: DataClayObject, name: str) -> Any:
        self._materialize(records)
        return getattr(self._reach(obj, False), name)

    def _op_set_attribute(
        self, records: list, obj: DataClayObject, name: str, value: Any
    ) -> None:
        # Checked before anything arrives: a denial leaves no trace.
        obj = self._reach(obj, True)
        self._materialize(records)
        setattr(obj, name, value)

    def _op_delete_attribute(
        self, records: list, obj: DataClayObject, name: str
    ) -> None:
        delattr(self._reach(obj, True), name)

    def _op_call(
        self,
        records: list,
        obj: DataClayObject,
        name: str,
        args: tuple,
        kwargs: dict,
        limits: execution.Constraints | None = None,
    ) -> Any:
        obj = self._reach(obj, True)
        self._materialize(records)
        method = getattr(obj, name)
        if not getattr(method, "_dc_activemethod", False):
            raise DataClayException(
                f"{type(obj).__qualname__}.{name} is not an active method; decorate it "
                "with @activemethod to call it on the object's backend"
            )
        if limits is None:
            result = method(*args, **kwargs)
            if inspect.iscoroutine(result):
                result = self._run_coroutine(result)
            return result
        with execution.applied(limits):
            result = method(*args, **kwargs)
            if inspect.iscoroutine(result):
                result = self._run_coroutine(result)
            return result

    def _op_metadata(self, records: list, obj: DataClayObject) -> Any:
        return self._reach(obj, False)._dc_meta

    def _op_get_object(
        self, records: list, object_id: uuid.UUID
    ) -> DataClayObject | None:
        if object_id in self.consolidated:
            return self.consolidated[object_id]
        obj = self.objects.get(object_id)
        if obj is None:
            self.server.take_arrivals()
            obj = self.objects.get(object_id)
        return None if obj is None else self._reach(obj, False)

    def _op_locate(self, records: list, object_id: uuid.UUID) -> uuid.UUID | None:
        if object_id not in self.objects:
            self.server.take_arrivals()
        if object_id in self.objects:
            return self.backend_id
        return self.moved.get(object_id)

    def _op_add_alias(
        self,
        records: list,
        dataset: str,
        alias: str,
        object_id: uuid.UUID,
        cls: type,
        backend_id: uuid.UUID,
    ) -> None:
        self._check_dataset(dataset, f"alias {alias!r}", True)
        self._add_alias(dataset, alias, (object_id, cls, backend_id))

    def _op_get_alias(
        self, records: list, dataset: str, alias: str
    ) -> serialization.Reference:
        self._check_dataset(dataset, f"alias {alias!r}", False)
        entry = self.aliases.get((dataset, alias))
        if entry is None:
            raise AliasDoesNotExistError(alias, dataset)
        object_id, cls, backend_id = entry
        known = heap_lookup(object_id)  # held here, or seen moving: fresher
        if known is not None:
            backend_id = known._dc_meta.master_backend_id or backend_id
        return serialization.Reference(object_id, cls, backend_id, dataset)

    def _op_delete_alias(self, records: list, dataset: str, alias: str) -> None:
        self._check_dataset(dataset, f"alias {alias!r}", True)
        with self._aliases_lock:
            if self.aliases.pop((dataset, alias), None) is None:
                raise AliasDoesNotExistError(alias, dataset)

    def _op_aliases_of(
        self, records: list, object_id: uuid.UUID, dataset: str
    ) -> list[str]:
        self._check_dataset(dataset, f"the aliases of object {object_id}", False)
        with self._aliases_lock:
            return [
                alias
                for (alias_dataset, alias), entry in self.aliases.items()
                if entry[0] == object_id and alias_dataset == dataset
            ]

    def _op_move(
        self,
        records: list,
        obj: DataClayObject,
        target_id: int,
        recursive: bool,
        remotes: bool,
    ) -> None:
        """Move ``obj`` to the backend ``target_id`` (its id as an integer)."""
        target = fast_uuid(target_id)
        obj = self._reach(obj, True)
        root = obj._dc_meta.id
        if not recursive:
            if target != self.backend_id:
                if self._ship_early(obj, target):
                    pass
                elif self._ship_plain(obj, target):
                    self._moved_away([obj], target)
                else:
                    self._ship_closure([root], target, set(), follow_references=False)
            return
        assert self.runtime is not None
        # breadth first over backends; each round ships what one backend holds
        visited: set[uuid.UUID] = set()
        frontier: dict[uuid.UUID | None, list[uuid.UUID]] = {self.backend_id: [root]}
        while frontier:
            found: dict[uuid.UUID | None, list[uuid.UUID]] = {}
            for backend_id, ids in frontier.items():
                if backend_id is None:
                    for object_id in ids:
                        try:
                            located = self.runtime._locate(object_id)
                        except ObjectDoesNotExistError:
                            continue  # a discarded version: nothing to move
                        found.setdefault(located, []).append(object_id)
                    continue
                if backend_id == self.backend_id:
                    shipped, outside = self._ship_closure(ids, target, visited)
                else:
                    shipped, outside = self.runtime.request(
                        backend_id, "move_closure", (ids, target, visited)
                    )
                visited.update(shipped)
                for object_id, where in outside:
                    if object_id not in visited:
                        found.setdefault(where, []).append(object_id)
            if not remotes:
                break
            frontier = {b: list(dict.fromkeys(ids)) for b, ids in found.items()}
        logger.debug("moved %d objects to backend %s", len(visited), target)

    def _op_move_closure(
        self,
        records: list,
        ids: list[uuid.UUID],
        target: uuid.UUID,
        visited: set[uuid.UUID],
    ) -> tuple[list[uuid.UUID], list[tuple[uuid.UUID, uuid.UUID | None]]]:
        return self._ship_closure(ids, target, visited)

    def _ship_closure(
        self,
        ids: list[uuid.UUID],
        target: uuid.UUID,
        visited: set[uuid.UUID],
        follow_references: bool = True,
    ) -> tuple[list[uuid.UUID], list[tuple[uuid.UUID, uuid.UUID | None]]]:
        """Send ``ids`` and what they reach here to ``target``.

        Returns the ids handled here and the referents held elsewhere, with
        where they are believed to be (``None``: unknown).
        """
        with serialization.paused_gc():
            return self._ship_closure_now(ids, target, visited, follow_references)

    def _ship_closure_now(
        self,
        ids: list[uuid.UUID],
        target: uuid.UUID,
        visited: set[uuid.UUID],
        follow_references: bool,
    ) -> tuple[list[uuid.UUID], list[tuple[uuid.UUID, uuid.UUID | None]]]:
        assert self.runtime is not None
        outside: list[tuple[uuid.UUID, uuid.UUID | None]] = []
        roots = []
        if any(object_id not in self.objects for object_id in ids):
            self.server.take_arrivals()
        for object_id in ids:
            obj = self.objects.get(object_id)
            if obj is not None:
                roots.append(obj)
            elif object_id in self.consolidated:
                # a consolidated version stands for its original
                original = self.consolidated[object_id]
                outside.append(
                    (original._dc_meta.id, original._dc_meta.master_backend_id)
                )
            elif object_id not in visited and object_id not in self.discarded:
                outside.append((object_id, self.moved.get(object_id)))
        root_ids = {obj._dc_meta.id for obj in roots}
        seen = set(visited)

        def follow(ref: DataClayObject) -> bool:
            meta = ref._dc_meta
            if meta.id in seen:
                return False
            seen.add(meta.id)
            if ref.__dict__["_dc_is_local"]:
                if not ref.__dict__["_dc_is_loaded"]:
                    self.load(ref)
                return follow_references or meta.id in root_ids
            outside.append((meta.id, meta.master_backend_id))
            return False

        if target == self.backend_id:
            # already there: nothing to send, but the closure tells the frontier
            handled: list[DataClayObject] = []
            serialization.dumps(roots, self.register_new, handled, follow=follow)
            return [o._dc_meta.id for o in handled], outside
        shipped = self._ship_in_chunks(roots, target, follow)
        self._moved_away(shipped, target)
        return [o._dc_meta.id for o in shipped], outside

    def _moved_away(self, shipped: list[DataClayObject], target: uuid.UUID) -> None:
        """Turn objects ``target`` now holds into proxies that point there."""
        objects, moved = self.objects, self.moved
        for obj in shipped:
            obj._dc_drop_state()
            obj.__dict__.update(_dc_is_local=False, _dc_is_loaded=False)
            meta = obj._dc_meta
            objects.pop(meta.id, None)
            moved[meta.id] = target
            meta.master_backend_id = target
            heap_add(obj)  # still referred to here, now as a proxy
        logger.debug("shipped %d objects to backend %s", len(shipped), target)

    def _ship_plain(self, obj: DataClayObject, target: uuid.UUID) -> bool:
        """Send one object whose state holds no other object as a plain pickle.

        Returns true once the target holds it, false when the state needs the
        job's pickler (it refers to persistent objects, which only travel as
        references); nothing has been sent then.
        """
        assert self.runtime is not None
        if not obj.__dict__["_dc_is_loaded"]:
            self.load(obj)
        session = current_session()
        try:
            payload, buffers = serialization.dumps_store(
                obj, session.username, session.dataset, True
            )
        except (TypeError, pickle.PicklingError, AttributeError):
            return False
        self.runtime.send(target, payload, 0, buffers)
        self._stored_at.setdefault(target, set()).add(type(obj))
        return True

    def _ship_early(self, obj: DataClayObject, target: uuid.UUID) -> bool:
        """Send one plain object to ``target``; the move's answer need not wait.

        Only where nothing can stop the target from taking it (it has taken
        objects of this class from here before, as plain stores, and every
        value of the state is a plain one: no other class to import, no
        ``__setstate__`` to run) and where its socket holds the state before
        the answer leaves (a Unix socket: the kernel queues a message at the
        receiver before ``send`` returns).

        It goes as an arrival (``RequestServer.take_arrivals``): nobody at the
        target is woken up for it, and every request that comes there after
        the answer, from any process, finds the object, since a backend that
        misses an object first takes what has arrived. Should the target fail
        to take it, it sends the object back here (``_op_take_back``). If the
        connection for arrivals has failed, this returns false and the move
        waits for the target (the next one makes the connection again).

        Returns whether it was sent; if not, nothing has changed.
        """
        assert self.runtime is not None
        cls = type(obj)
        state = obj.__dict__
        if (
            cls not in self._stored_at.get(target, ())
            or cls._dc_setstate is not None
            or not state["_dc_is_loaded"]
        ):
            return False
        kept = obj._dc_get_state()
        if type(kept) is not dict or not serialization.plain_arguments(
            tuple(kept.values())
        ):
            return False
        connection = self.runtime.arrivals_connection(target, self.backend_id)
        if connection is None:
            return False
        session = current_session()
        try:
            payload, buffers = serialization.dumps_store(
                obj, session.username, session.dataset, True, kept
            )
        except (TypeError, pickle.PicklingError, AttributeError):
            return False
        try:
            connection.send_arrival(payload, buffers)
        except BackendUnavailableError as exc:
            # what was sent of it is dropped there; the move waits instead
            logger.debug("arrival to backend %s not sent: %s", target, exc)
            return False
        self._moved_away([obj], target)
        return True

    def _ship_in_chunks(
        self,
        roots: list[DataClayObject],
        target: uuid.UUID,
        follow: Callable[[DataClayObject], bool],
    ) -> list[DataClayObject]:
        """Send ``roots`` and what ``follow`` accepts to ``target``, in chunks.

        A chunk is sent by another thread while the next one is pickled, so
        this side pickling and the target rebuilding objects overlap. Nothing
        changes here until every chunk has arrived: a failure leaves every
        object in place (the target may keep copies nobody refers to).
        """
        assert self.runtime is not None
        runtime = self.runtime
        session = current_session()
        shipped: list[DataClayObject] = []
        registered: list[DataClayObject] = []
        register = runtime._register_for(target)

        def ship(ref: DataClayObject) -> bool:
            if follow(ref):
                shipped.append(ref)
                return True
            return False

        pending: list[DataClayObject] = []
        args: tuple = (roots,)
        sent: list[concurrent.futures.Future] = []
        try:
            while True:
                message = (
                    "receive_objects",
                    session.username,
                    session.dataset,
                    True,
                    args,
                )
                batch = list(pending)
                payload, count, buffers = serialization.dumps(
                    message,
                    register,
                    batch,
                    follow=ship,
                    registered=registered,
                    limit=SHIP_CHUNK_RECORDS,
                )
                pending, args = batch[count:], ([],)
                if not pending and not sent:  # one chunk: no hand-off
                    runtime.send(target, payload, count, buffers)
                    break
                sent.append(
                    self._sender().submit(runtime.send, target, payload, count, buffers)
                )
                if not pending:
                    break
            for future in sent:
                future.result()
        except BaseException:
            for future in sent:
                future.cancel()
            unregister(registered)
            raise
        for obj in registered:  # volatile here, now persistent on the target
            obj._dc_drop_state()
            obj.__dict__.update(_dc_is_local=False, _dc_is_loaded=False)
            heap_add(obj)
        return shipped

    def _sender(self) -> concurrent.futures.ThreadPoolExecutor:
        # one thread, kept: its connections to the targets are reused
        with self._loop_lock:
            if self._shipper is None:
                self._shipper = concurrent.futures.ThreadPoolExecutor(
                    1, f"backend-{self.rank}-ship"
                )
        return self._shipper

    # -- versions ---------------------------------------------------------------------

    def _stamp(self, obj: DataClayObject) -> str:
        """Identify the state of an original: consolidations taken and content."""
        if not obj.__dict__["_dc_is_loaded"]:
            self.load(obj)
        count = self._consolidations.get(obj._dc_meta.id, 0)
        return f"{count}:{serialization.digest(obj._dc_get_state())}"

    def _op_new_version(
        self, records: list, obj: DataClayObject, target: uuid.UUID | None
    ) -> tuple[DataClayObject, Any]:
        obj = self._reach(obj, True)
        if not obj.__dict__["_dc_is_loaded"]:
            self.load(obj)
        meta = obj._dc_meta
        original_id: uuid.UUID
        original_backend: uuid.UUID | None
        base_stamp: str | None
        if meta.original_object_id is None:
            original_id, chain = meta.id, []
            original_backend, base_stamp = self.backend_id, self._stamp(obj)
        else:
            original_id = meta.original_object_id
            chain = [*meta.versions_object_ids, meta.id]
            original_backend, base_stamp = meta.original_backend_id, meta.base_stamp
        version_meta = dataclasses.replace(
            meta,
            id=new_object_id(),
            original_object_id=original_id,
            versions_object_ids=chain,
            original_backend_id=original_backend,
            base_stamp=base_stamp,
        )
        state = obj._dc_get_state()
        target = target or self.backend_id
        version_meta.master_backend_id = target
        record = (type(obj), version_meta, state)
        if target == self.backend_id:
            # a pickled copy: the version must not share mutable state, arrays
            # included (their out-of-band buffers are views of the original)
            payload, count, buffers = serialization.dumps([record])
            copies = [bytearray(memoryview(b).cast("B")) for b in buffers]
            copied, _ = serialization.loads(payload, count, copies)
            self._materialize(copied)
        else:
            assert self.runtime is not None
            self.runtime.request(target, "receive_records", ([record],))
        version = heap_get_or_create(version_meta.id, type(obj), target)
        logger.debug("version %s of %s made on %s", version_meta.id, meta.id, target)
        return version, version_meta

    def _op_receive_records(self, records: list, objects: list) -> None:
        self._materialize(objects)

    def _version_of(self, version: DataClayObject) -> DataClayObject:
        object_id = version._dc_meta.id
        if object_id in self.consolidated or object_id in self.discarded:
            raise ObjectIsNotVersionError(object_id)
        version = self._reach(version, True)
        if version._dc_meta.original_object_id is None:
            raise ObjectIsNotVersionError(object_id)
        return version

    def _op_consolidate_version(
        self, records: list, version: DataClayObject, check: bool
    ) -> None:
        assert self.runtime is not None
        version = self._version_of(version)
        if not version.__dict__["_dc_is_loaded"]:
            self.load(version)
        meta = version._dc_meta
        assert meta.original_object_id is not None  # checked by _version_of
        original = heap_get_or_create(
            meta.original_object_id, type(version), meta.original_backend_id
        )
        expected = meta.base_stamp if check else None
        state = version._dc_get_state()
        if original.__dict__["_dc_is_local"]:
            # the version is retired right after: its values can go over as they are
            self._op_take_state([], original, state, expected, meta.id)
        else:
            self.runtime.object_request(
                original, "take_state", state, expected, meta.id
            )
        for object_id in [*meta.versions_object_ids, meta.id]:
            self._retire(object_id, original)
        logger.debug("version %s consolidated into %s", meta.id, original._dc_meta.id)

    def _retire(self, object_id: uuid.UUID, original: DataClayObject) -> None:
        assert self.runtime is not None
        if object_id in self.objects or object_id in self.consolidated:
            self._op_retire_version([], object_id, original)
            return
        try:
            where = self.runtime._locate(object_id)
        except ObjectDoesNotExistError:
            return  # a discarded intermediate version
        self.runtime.request(where, "retire_version", (object_id, original))

    def _op_retire_version(
        self, records: list, object_id: uuid.UUID, original: DataClayObject
    ) -> None:
        version = self.objects.pop(object_id, None)
        self.consolidated[object_id] = original
        if version is not None:
            version._dc_drop_state()
            version.__dict__.update(_dc_is_local=False, _dc_is_loaded=False)
            heap_add(version)
        if self._store is not None:
            self._store.delete(object_id)

    def _op_take_state(
        self,
        records: list,
        original: DataClayObject,
        state: Any,
        expected_stamp: str | None,
        version_id: uuid.UUID,
    ) -> None:
        original = self._held(original)
        with self._version_lock:
            if expected_stamp is not None:
                stamp = self._stamp(original)
                if stamp != expected_stamp:
                    raise VersionConflictError(
                        f"version {version_id} was not consolidated: its original "
                        f"{original._dc_meta.id} changed since the version was made; "
                        "make a new version from the current original and redo "
                        "the change"
                    )
            if not original.__dict__["_dc_is_loaded"]:
                self.load(original)
            original._dc_drop_state()
            original._dc_set_state(state)
            object_id = original._dc_meta.id
            self._consolidations[object_id] = self._consolidations.get(object_id, 0) + 1

    def _op_discard_version(self, records: list, version: DataClayObject) -> None:
        version = self._version_of(version)
        object_id = version._dc_meta.id
        self.objects.pop(object_id, None)
        self.discarded.add(object_id)
        version._dc_drop_state()
        version.__dict__.update(_dc_is_local=False, _dc_is_loaded=False)
        heap_add(version)
        if self._store is not None:
            self._store.delete(object_id)
        logger.debug("version %s discarded", object_id)

    def _op_flush(self, records: list) -> int:
        self.server.take_arrivals()
        self._gate.enter_alone(FLUSH_WAIT_S)
        started = time.monotonic()
        try:
            store = self._open_store()
            with serialization.paused_gc():
                loaded = [
                    o for o in self.objects.values() if o.__dict__["_dc_is_loaded"]
                ]
                store.write_many(
                    (o._dc_meta.id, o._dc_meta.class_name, o._dc_get_state())
                    for o in loaded
                )
                for obj in loaded:
                    obj._dc_drop_state()
                    obj.__dict__["_dc_is_loaded"] = False
                store.flush()
            count = len(loaded)
        finally:
            self._gate.leave_alone()
        logger.info(
            "backend rank %d flushed %d objects to %s in %.2f s",
            self.rank,
            count,
            store.path,
            time.monotonic() - started,
        )
        return count

    def _op_add_sys_path(self, records: list, paths: list[str]) -> None:
        for path in reversed(paths):
            if path not in sys.path and os.path.isdir(path):
                sys.path.insert(0, path)

    def _op_shutdown(self, records: list) -> None:
        logger.info("backend rank %d asked to stop", self.rank)
        self.stopped.set()
