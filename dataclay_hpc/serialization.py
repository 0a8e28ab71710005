"""How requests, object states and references are pickled.

A persistent object never travels by value inside a request: it becomes a
reference (id, class, backend) that the receiving process resolves to its own
object for that id. A volatile object met while pickling a request to a backend
is registered for that backend on the spot, and its state travels in the same
message after the request, as one *record* per object. The records are found
with a work list rather than recursion, so graphs of any depth and with cycles
go through. numpy arrays go out of band (pickle protocol 5).
"""

from __future__ import annotations

import contextlib
import copyreg
import gc
import hashlib
import importlib
import io
import pickle
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from .exceptions import ClassImportError, DataClayException
from .metadata import fast_uuid
from .object import (
    PICKLE_DISPATCH,
    DataClayObject,
    heap_get_or_create,
    process_backend,
    set_object_reducer,
)

__all__ = [
    "ClassImportError",
    "Record",
    "Reference",
    "dumps",
    "dumps_store",
    "loads",
    "plain_arguments",
]

# value types that cannot hold a persistent object: they pickle without the
# job's pickler
PLAIN_TYPES = frozenset({type(None), bool, int, float, str, bytes})

# the same, and UUIDs (backend and object ids): the plain pickler writes them
PLAIN_VALUE_TYPES = PLAIN_TYPES | {uuid.UUID}

Record = tuple[type, Any, Any]
"""One object shipped with a request: (class, metadata, state)."""

# messages with more records than this pause the cyclic garbage collector:
# it rescans the growing heap while 100 000 objects are built, which more
# than doubled the time to unpickle them
GC_PAUSE_RECORDS = 256
_gc_lock = threading.Lock()
_gc_pauses = 0


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off inside the block (nests, threads)."""
    global _gc_pauses
    with _gc_lock:
        _gc_pauses += 1
        if _gc_pauses == 1:
            gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0:
                gc.enable()


def _reference(
    object_id: int, cls: type, backend_id: int | None, dataset_name: str | None
):
    backend = None if backend_id is None else _uuid(backend_id)
    return heap_get_or_create(fast_uuid(object_id), cls, backend, dataset_name)


class Reference:
    """A persistent object as it travels, without a Python object for it here.

    It pickles (with any pickler) as the reference the job's pickler writes
    for the object itself, and unpickles as the receiving process's object for
    that id. A backend answers with one instead of making a proxy of its own
    just to send it.
    """

    __slots__ = ("backend_id", "cls", "dataset", "object_id")

    def __init__(
        self,
        object_id: uuid.UUID,
        cls: type,
        backend_id: uuid.UUID | None,
        dataset: str | None,
    ) -> None:
        self.object_id = object_id
        self.cls = cls
        self.backend_id = backend_id
        self.dataset = dataset

    def __reduce__(self) -> tuple[Any, tuple]:
        backend = self.backend_id
        return _reference, (
            self.object_id.int,
            self.cls,
            None if backend is None else backend.int,
            self.dataset,
        )


# backend ids recur in every reference: keep one UUID object per value
_known_uuids: dict[int, uuid.UUID] = {}


def _uuid(value: int) -> uuid.UUID:
    known = _known_uuids.get(value)
    if known is not None:
        return known
    return fast_uuid(value)


def remember_uuid(value: uuid.UUID) -> None:
    """Make references to ``value`` (a backend id) cheap to unpickle."""
    _known_uuids[value.int] = value


def _reduce_uuid(value: uuid.UUID) -> tuple[Any, tuple[int]]:
    # UUID's own reduction goes through copyreg: ~4 us to dump, ~3 us to load
    return _uuid, (value.int,)


# the pickler dumping on each thread right now, for _reduce_object
_dumping = threading.local()


def current_pickler() -> Any:
    """Return the pickler dumping on this thread right now, if any."""
    return getattr(_dumping, "pickler", None)


def _reduce_object(obj: DataClayObject) -> Any:
    pickler = _dumping.pickler
    state = obj.__dict__
    meta = state["_dc_meta"]
    if not state["_dc_is_registered"]:
        cls = type(obj)
        if cls.__module__ == "__main__" and process_backend() is None:
            raise ClassImportError(
                f"class {cls.__qualname__} is defined in the script's __main__, which "
                "the backends cannot import: move the class into a module"
            )
        pickler.register(obj)
        pickler.new_objects.append(obj)
        pickler.registered.append(obj)
    elif pickler.follow is not None and pickler.follow(obj):
        pickler.new_objects.append(obj)
    backend_id = None if pickler.stable else meta.master_backend_id
    # ids as plain ints: no reduction of their own, ~6 us less per reference
    return _reference, (
        meta.id.int,
        type(obj),
        None if backend_id is None else backend_id.int,
        meta.dataset_name,
    )


# Reductions by exact type, looked up in C. Every DataClayObject subclass is
# added as it is created, so no Python hook runs for the other objects of a
# message (a reducer_override would run for every function and class too).
PICKLE_DISPATCH.update(copyreg.dispatch_table)
PICKLE_DISPATCH[uuid.UUID] = _reduce_uuid
set_object_reducer(_reduce_object)


class _Pickler(pickle.Pickler):
    """Writes persistent objects as references; reusable through ``reset``."""

    dispatch_table = PICKLE_DISPATCH

    def __init__(
        self, file: io.BytesIO, buffers: list[Any] | None, register: Any
    ) -> None:
        super().__init__(
            file,
            protocol=5,
            buffer_callback=None if buffers is None else buffers.append,
        )
        self.register = register
        self.new_objects: list[DataClayObject] = []
        # the volatile ones among new_objects, handed to register
        self.registered: list[DataClayObject] = []
        # called for each persistent object met; True adds its record
        self.follow: Any = None
        # references without their (changing) backend, for digests
        self.stable = False

    def dump(self, obj: Any) -> None:
        """Pickle ``obj``; persistent objects become references."""
        previous = getattr(_dumping, "pickler", None)
        _dumping.pickler = self
        try:
            super().dump(obj)
        finally:
            _dumping.pickler = previous


class _MessagePickler(_Pickler):
    def __init__(self) -> None:
        self.file = io.BytesIO()
        self.buffers: list[Any] = []
        super().__init__(self.file, self.buffers, None)

    def reset(
        self, register: Any, new_objects: list, follow: Any, registered: list
    ) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.clear_memo()
        self.buffers.clear()
        self.register = register
        self.new_objects = new_objects
        self.follow = follow
        self.registered = registered

    def release(self) -> None:
        # drop what the last message referenced; reset() clears the rest
        self.buffers.clear()
        self.register = None
        self.new_objects = []
        self.follow = None
        self.registered = []


_per_thread = threading.local()


def _take_pickler() -> _MessagePickler:
    # taken out while in use: a __getstate__ that sends a request gets its own
    pickler = getattr(_per_thread, "pickler", None)
    if pickler is None:
        return _MessagePickler()
    _per_thread.pickler = None
    return pickler


def class_import_error(exc: BaseException) -> ClassImportError:
    """Explain an ``ImportError``/``AttributeError`` met while unpickling."""
    module = getattr(exc, "name", None)
    if module == "__main__" or "__main__'" in str(exc):
        hint = (
            "classes defined in a script's __main__ cannot be imported elsewhere: "
            "move the class into a module"
        )
    else:
        hint = (
            "make the module importable on every rank (same module path, for "
            "example through PYTHONPATH)"
        )
    return ClassImportError(f"cannot import a class of the message ({exc}); {hint}")


# class path -> class, for requests that name their object's class by path
_classes: dict[str, type] = {}


def class_from_path(path: str) -> type:
    """Return the class whose ``module.qualname`` is ``path``, importing it.

    Raises:
        ClassImportError: It cannot be imported here.
    """
    cls = _classes.get(path)
    if cls is not None:
        return cls
    parts = path.split(".")
    found: Any = None
    error: BaseException = ImportError(f"no module in {path!r}", name=parts[0])
    # the longest importable prefix is the module; the rest is the qualname
    for split in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError as exc:
            error = exc
            continue
        try:
            for name in parts[split:]:
                found = getattr(found, name)
        except AttributeError as exc:
            raise class_import_error(exc) from exc
        break
    if not isinstance(found, type):
        raise class_import_error(error) from error
    _classes[path] = found
    return found


def dumps(
    message: Any,
    register: Any = None,
    new_objects: list | None = None,
    *,
    ship: bool = True,
    follow: Any = None,
    registered: list | None = None,
    limit: int | None = None,
) -> tuple[bytes, int, list[Any]]:
    """Pickle ``message`` followed by one record per volatile object it reaches.

    Args:
        message: What to send.
        register: Called with each volatile ``DataClayObject`` met, before its
            reference is written; it must give the object an id and a backend.
            ``None`` refuses volatile objects.
        new_objects: Filled with the objects handed to ``register``, also when
            pickling fails half-way, so the caller can undo the registrations.
        ship: Write the records of the new objects after the message; ``False``
            when ``register`` keeps them where they are.
        follow: Called with each persistent object met; when it returns true,
            the object's record is written too (and it joins ``new_objects``).
        registered: Filled with the objects handed to ``register`` (a part of
            ``new_objects``), also when pickling fails half-way.
        limit: Write at most this many records; the objects of
            ``new_objects`` past the count returned are still to be written.
            ``new_objects`` may come filled: their records go first.

    Returns:
        ``(payload, number of records, out-of-band buffers)``.
    """
    if new_objects is None:
        new_objects = []
    pickler = _take_pickler()
    if registered is None:
        registered = []
    pickler.reset(register or _refuse_volatile, new_objects, follow, registered)
    pause = contextlib.ExitStack()
    previous = getattr(_dumping, "pickler", None)
    # the records go straight to the C dump: the wrapper's thread-local dance
    # per record was 10 % of shipping 100 000 objects
    dump_record = pickle.Pickler.dump
    try:
        pickler.dump(message)
        count = 0
        stop = float("inf") if limit is None else limit
        # new_objects grows while records are written
        while ship and count < len(new_objects) and count < stop:
            if count == GC_PAUSE_RECORDS:
                pause.enter_context(paused_gc())
            obj = new_objects[count]
            state = obj._dc_get_state()  # may send requests of its own
            _dumping.pickler = pickler
            dump_record(pickler, (type(obj), obj.__dict__["_dc_meta"], state))
            count += 1
        return pickler.file.getvalue(), count, list(pickler.buffers)
    finally:
        _dumping.pickler = previous
        pause.close()
        pickler.release()
        _per_thread.pickler = pickler


# containers of plain values a request may carry and still pickle plainly,
# and how long: checking the items of a longer one costs what it saves
_SHALLOW = frozenset({tuple, list, dict})
_PLAIN_ITEMS = 256


def plain_arguments(args: tuple) -> bool:
    """Say whether ``args`` hold only values no persistent object can hide in.

    Values of ``PLAIN_VALUE_TYPES``, and tuples, lists and dicts of them
    (one level deep, up to 256 items): such a request pickles without the
    job's pickler.
    """
    plain = PLAIN_VALUE_TYPES
    for value in args:
        kind = type(value)
        if kind in plain:
            continue
        if kind not in _SHALLOW or len(value) > _PLAIN_ITEMS:
            return False
        if kind is tuple or kind is list:
            if not all(type(item) in plain for item in value):
                return False
        elif not all(
            type(key) in plain and type(item) in plain for key, item in value.items()
        ):
            return False
    return True


def dumps_store(
    obj: DataClayObject,
    username: str,
    dataset: str,
    inside_job: bool,
    state: Any = None,
) -> tuple[bytes, list[Any]]:
    """Pickle a ``store`` request of ``obj``: its record with the plain pickler.

    For an object whose state holds no other object; the backend's ``store``
    takes it without the records machinery. ``state``: the object's state,
    if the caller has it already.

    Returns:
        ``(payload, out-of-band buffers)``; the message has no records.

    Raises:
        TypeError: The state holds a persistent object (they only travel as
            references, through ``dumps``) or a value that cannot be pickled;
            ``pickle.PicklingError`` and ``AttributeError`` for the latter too.
    """
    buffers: list[Any] = []
    if state is None:
        state = obj._dc_get_state()
    record = (type(obj), obj.__dict__["_dc_meta"], state)
    message = ("store", username, dataset, inside_job, record)
    return pickle.dumps(message, protocol=5, buffer_callback=buffers.append), buffers


def loads(
    payload: bytes, count: int, buffers: Sequence[Any]
) -> tuple[Any, list[Record]]:
    """Undo ``dumps``: return the message and its records.

    Raises:
        ClassImportError: A class in the message cannot be imported here.
    """
    try:
        if not count:
            return pickle.loads(payload, buffers=buffers), []
        unpickler = pickle.Unpickler(io.BytesIO(payload), buffers=buffers)
        with paused_gc() if count > GC_PAUSE_RECORDS else contextlib.nullcontext():
            message = unpickler.load()
            return message, [unpickler.load() for _ in range(count)]
    except (ImportError, AttributeError) as exc:
        raise class_import_error(exc) from exc


def _refuse_volatile(obj: DataClayObject) -> None:
    raise DataClayException(
        f"volatile object {obj!r} cannot be sent here; make_persistent() it first"
    )


def digest(state: Any) -> str:
    """Return a digest of a state that does not depend on where objects live."""
    file = io.BytesIO()
    pickler = _Pickler(file, None, _refuse_volatile)
    pickler.stable = True
    pickler.dump(state)
    return hashlib.blake2b(file.getbuffer(), digest_size=16).hexdigest()
