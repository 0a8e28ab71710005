"""Persistent objects: ``DataClayObject`` and ``@activemethod``.

An annotated attribute of a ``DataClayObject`` subclass is persistent: on the
backend that holds the object it is a plain entry of the instance ``__dict__``;
anywhere else the same instance is a proxy whose attribute reads and writes, and
whose active-method calls, go to that backend. Attributes without an annotation
are transient: they stay in the process that set them.

A process holds at most one Python object per object id (the *heap*), so
``get_by_alias`` and ``get_by_id`` return the very object the process already
has, and references that arrive from a backend resolve to it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .context import current_session
from .exceptions import DataClayException, ObjectNotRegisteredError
from .metadata import ObjectMetadata

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["DataClayObject", "StorageObject", "activemethod"]

logger = logging.getLogger(__name__)

T = TypeVar("T", bound="DataClayObject")
F = TypeVar("F", bound=Callable[..., Any])

_MISSING = object()

# -- the process heap ---------------------------------------------------------

_heap_lock = threading.RLock()
# Weak references in a plain dict, swept when dead entries pile up: a
# WeakValueDictionary builds a Python-level KeyedRef per entry (~10 us), which
# was a third of the time of making 100 000 objects persistent.
_proxies: dict[uuid.UUID, weakref.ref] = {}
_sweep_at = 1024
# the backend this process is, if it is one; its objects are held strongly there
_backend: Backend | None = None


def set_process_backend(backend: Backend | None) -> None:
    """Declare that this process is ``backend`` (``None``: it is not a backend)."""
    global _backend
    _backend = backend


def process_backend() -> Backend | None:
    """Return the backend this process is, or ``None``."""
    return _backend


def heap_lookup(object_id: uuid.UUID) -> DataClayObject | None:
    """Return this process's object for ``object_id``, if it has one."""
    if _backend is not None:
        obj = _backend.objects.get(object_id)
        if obj is not None:
            return obj
    ref = _proxies.get(object_id)
    return None if ref is None else ref()


def heap_add(obj: DataClayObject) -> None:
    """Remember ``obj`` as this process's object for its id."""
    global _sweep_at
    _proxies[obj.__dict__["_dc_meta"].id] = weakref.ref(obj)
    if len(_proxies) >= _sweep_at:
        with _heap_lock:
            for object_id in [k for k, ref in list(_proxies.items()) if ref() is None]:
                _proxies.pop(object_id, None)
            _sweep_at = max(1024, 2 * len(_proxies))


def heap_remove(obj: DataClayObject) -> None:
    """Forget ``obj`` as this process's object for its id."""
    object_id = obj.__dict__["_dc_meta"].id
    ref = _proxies.get(object_id)
    if ref is not None and ref() is obj:
        del _proxies[object_id]


def heap_get_or_create(
    object_id: uuid.UUID,
    cls: type,
    backend_id: uuid.UUID | None,
    dataset_name: str | None = None,
) -> DataClayObject:
    """Return this process's object for an id, making a proxy when it has none."""
    obj = heap_lookup(object_id)
    if obj is not None:
        if dataset_name is not None:
            meta = obj.__dict__["_dc_meta"]
            if meta.dataset_name is None:
                meta.dataset_name = dataset_name
        return obj
    with _heap_lock:
        obj = heap_lookup(object_id)
        if obj is None:
            obj = object.__new__(cls)
            obj.__dict__.update(
                _dc_meta=ObjectMetadata(
                    id=object_id,
                    class_name=_class_path(cls),
                    master_backend_id=backend_id,
                    dataset_name=dataset_name,
                ),
                _dc_is_registered=True,
                _dc_is_local=False,
                _dc_is_loaded=False,
            )
            heap_add(obj)
    return obj


# reductions by exact type for the job's picklers (filled by serialization);
# every DataClayObject subclass maps to the reducer that writes a reference
PICKLE_DISPATCH: dict[type, Callable[[Any], Any]] = {}
_object_reducer: Callable[[Any], Any] | None = None


def set_object_reducer(reducer: Callable[[Any], Any]) -> None:
    """Install the function that pickles a ``DataClayObject`` as a reference."""
    global _object_reducer
    _object_reducer = reducer


def _reduce_object(obj: Any) -> Any:
    assert _object_reducer is not None
    return _object_reducer(obj)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- persistent attributes ----------------------------------------------------


class _PersistentAttribute:
    """Data descriptor for one annotated attribute.

    The fast path is a dict read: a loaded local object (or a volatile one)
    keeps its value in the instance ``__dict__`` under the same name. Anything
    else (a proxy, an object flushed to the store) takes the slow path.
    """

    __slots__ = ("default", "name")

    def __init__(self, name: str, default: Any) -> None:
        self.name = name
        self.default = default

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self if self.default is _MISSING else self.default
        try:
            return obj.__dict__[self.name]
        except KeyError:
            return _get_slow(obj, self)

    def __set__(self, obj: Any, value: Any) -> None:
        state = obj.__dict__
        if state["_dc_is_local"] and state["_dc_is_loaded"]:
            state[self.name] = value
        else:
            _set_slow(obj, self.name, value)

    def __delete__(self, obj: Any) -> None:
        state = obj.__dict__
        if not state["_dc_is_local"]:
            current_session().runtime.delete_attribute(obj, self.name)
            return
        _ensure_loaded(obj)
        try:
            del state[self.name]
        except KeyError:
            raise AttributeError(self.name) from None


def _ensure_loaded(obj: DataClayObject) -> None:
    if not obj.__dict__["_dc_is_loaded"]:
        backend = _backend
        if backend is None:  # pragma: no cover - a local unloaded object is a bug
            raise RuntimeError(
                f"object {obj._dc_meta.id} is unloaded outside a backend"
            )
        backend.load(obj)


def _get_slow(obj: DataClayObject, attribute: _PersistentAttribute) -> Any:
    state = obj.__dict__
    if not state["_dc_is_local"]:
        return current_session().runtime.get_attribute(obj, attribute.name)
    if not state["_dc_is_loaded"]:
        _ensure_loaded(obj)
        try:
            return state[attribute.name]
        except KeyError:
            pass
    if attribute.default is not _MISSING:
        return attribute.default
    raise AttributeError(
        f"{type(obj).__name__!r} object has no attribute {attribute.name!r}"
    )


def _set_slow(obj: DataClayObject, name: str, value: Any) -> None:
    state = obj.__dict__
    if not state["_dc_is_local"]:
        current_session().runtime.set_attribute(obj, name, value)
        return
    _ensure_loaded(obj)
    state[name] = value


# -- active methods -----------------------------------------------------------


def activemethod(func: F) -> F:
    """Make a method run on the backend that holds the object.

    On a volatile object, or on the backend that holds it, the method runs in
    place. On a proxy the call, its arguments and its result travel to and from
    the object's backend; volatile objects among the arguments become
    persistent there. ``async def`` methods are awaited on the backend.
    """
    name = func.__name__

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(self: DataClayObject, *args: Any, **kwargs: Any) -> Any:
            state = self.__dict__
            if state["_dc_is_local"]:
                if not state["_dc_is_loaded"]:
                    _ensure_loaded(self)
                return await func(self, *args, **kwargs)
            runtime = current_session().runtime
            # to_thread copies the context, so the session follows the call
            return await asyncio.to_thread(
                runtime.call_active_method, self, name, args, kwargs
            )

        async_wrapper._dc_activemethod = True  # type: ignore[attr-defined]
        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(func)
    def wrapper(self: DataClayObject, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__
        if state["_dc_is_local"]:
            if not state["_dc_is_loaded"]:
                _ensure_loaded(self)  # transient attributes come back too
            return func(self, *args, **kwargs)
        return current_session().runtime.call_active_method(self, name, args, kwargs)

    wrapper._dc_activemethod = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


# -- the base class -----------------------------------------------------------


def _is_persistent_annotation(name: str, annotation: Any) -> bool:
    if name.startswith("_dc_") or name.startswith("__"):
        return False
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "ClassVar" not in text


def _custom_getstate(cls: type) -> Callable[[Any], Any] | None:
    getstate = getattr(cls, "__getstate__", None)
    if getstate is None or getstate is getattr(object, "__getstate__", None):
        return None
    return getstate


def _custom_setstate(cls: type) -> Callable[[Any, Any], None] | None:
    return getattr(cls, "__setstate__", None)


class _DataClayMeta(type):
    """Turns annotations into persistent attributes.

    It also registers every object made on a backend as persistent there.
    """

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]):
        annotations = namespace.get("__annotations__", {})
        own = [n for n, a in annotations.items() if _is_persistent_annotation(n, a)]
        for attr in own:
            namespace[attr] = _PersistentAttribute(attr, namespace.get(attr, _MISSING))
        cls = super().__new__(mcs, name, bases, namespace)
        inherited: list[str] = []
        for base in reversed(cls.__mro__[1:]):
            for attr in getattr(base, "_dc_properties", ()):
                if attr not in inherited:
                    inherited.append(attr)
        properties = tuple(inherited + [a for a in own if a not in inherited])
        cls._dc_properties = properties  # type: ignore[attr-defined]
        # looked up once: they are consulted for every state sent or stored
        cls._dc_getstate = _custom_getstate(cls)  # type: ignore[attr-defined]
        cls._dc_setstate = _custom_setstate(cls)  # type: ignore[attr-defined]
        PICKLE_DISPATCH[cls] = _reduce_object
        return cls

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)
        backend = _backend
        if backend is not None and not obj.__dict__["_dc_is_registered"]:
            # an object made inside a backend is persistent right there
            backend.register_new(obj)
        return obj


class DataClayObject(metaclass=_DataClayMeta):
    """Base class of persistent objects.

    Subclass it and annotate the attributes that must persist::

        class Person(DataClayObject):
            name: str
            age: int

            @activemethod
            def birthday(self) -> int:
                self.age += 1
                return self.age
    """

    _dc_properties: ClassVar[tuple[str, ...]] = ()
    _dc_getstate: ClassVar[Callable[[Any], Any] | None] = None
    _dc_setstate: ClassVar[Callable[[Any, Any], None] | None] = None
    _dc_meta: ObjectMetadata
    _dc_is_registered: bool
    _dc_is_local: bool
    _dc_is_loaded: bool

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        obj = super().__new__(cls)
        obj.__dict__.update(
            _dc_meta=ObjectMetadata(class_name=_class_path(cls)),
            _dc_is_registered=False,
            _dc_is_local=True,
            _dc_is_loaded=True,
        )
        return obj

    # -- state -----------------------------------------------------------------

    def _dc_get_state(self) -> Any:
        """Return the persistent state (``__getstate__`` when the class has one)."""
        getstate = type(self)._dc_getstate
        if getstate is not None:
            return getstate(self)
        state = self.__dict__
        return {name: state[name] for name in self._dc_properties if name in state}

    def _dc_set_state(self, state: Any) -> None:
        """Install a state made by ``_dc_get_state`` (``__setstate__`` if defined)."""
        setstate = type(self)._dc_setstate
        if setstate is not None:
            setstate(self, state)
        else:
            self.__dict__.update(state)

    def _dc_drop_state(self) -> None:
        """Forget the persistent state held in this process."""
        state = self.__dict__
        for name in self._dc_properties:
            state.pop(name, None)
        if type(self)._dc_getstate is not None:
            keep = {"_dc_meta", "_dc_is_registered", "_dc_is_local", "_dc_is_loaded"}
            for name in [n for n in state if n not in keep]:
                del state[name]

    # -- identity ----------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataClayObject):
            return NotImplemented
        if not (self._dc_is_registered and other._dc_is_registered):
            return self is other
        return self._dc_meta.id == other._dc_meta.id

    def __hash__(self) -> int:
        return hash(self._dc_meta.id)

    def __repr__(self) -> str:
        status = "instance" if self._dc_is_registered else "volatile instance"
        return f"<{self._dc_meta.class_name} {status} with ObjectID={self._dc_meta.id}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self!r} cannot be pickled on its own; it travels as a reference "
            "inside dataclay_hpc requests"
        )

    def getID(self) -> str | None:  # noqa: N802 - dataClay's name
        """Return the object's metadata as JSON, or ``None`` while it is volatile.

        Once it returns, the object's backend holds it: another program given
        the id finds it.
        """
        if not self._dc_is_registered:
            return None
        try:
            runtime = current_session().runtime
        except DataClayException:  # no client in this process: nothing posted
            runtime = None
        if runtime is not None:
            runtime.wait_for_stores()
        return self._dc_meta.to_json()

    # -- registration ------------------------------------------------------------

    def make_persistent(
        self, alias: str | None = None, backend_id: uuid.UUID | str | None = None
    ) -> None:
        """Store the object, and every volatile object it reaches, on one backend.

        On an object that is already persistent this moves it (not recursively)
        to ``backend_id`` when one is given, and adds ``alias`` when one is given.

        Args:
            alias: A name to find the object again with ``get_by_alias``.
            backend_id: The backend to store it on; a random one when ``None``.

        Raises:
            AliasAlreadyExistError: The alias is taken in the session's dataset.
            BackendDoesNotExistError: ``backend_id`` is not a backend of the job.
        """
        runtime = current_session().runtime
        if self._dc_is_registered:
            if alias is not None:  # first: a taken alias must not leave it moved
                runtime.add_alias(self, alias)
            if backend_id is not None:
                runtime.move(self, backend_id, recursive=False, remotes=True)
            return
        runtime.make_persistent(self, alias, backend_id)

    async def a_make_persistent(
        self, alias: str | None = None, backend_id: uuid.UUID | str | None = None
    ) -> None:
        """Awaitable ``make_persistent``."""
        await asyncio.to_thread(self.make_persistent, alias, backend_id)

    @classmethod
    def get_by_alias(cls: type[T], alias: str, dataset_name: str | None = None) -> T:
        """Return the object registered under ``alias``.

        Raises:
            AliasDoesNotExistError: No object has that alias in the dataset.
        """
        return current_session().runtime.get_by_alias(alias, dataset_name)

    @classmethod
    async def a_get_by_alias(
        cls: type[T], alias: str, dataset_name: str | None = None
    ) -> T:
        """Awaitable ``get_by_alias``."""
        return await asyncio.to_thread(cls.get_by_alias, alias, dataset_name)

    @classmethod
    def get_by_id(cls: type[T], object_id: uuid.UUID | str) -> T:
        """Return the object with id ``object_id``.

        Raises:
            ObjectDoesNotExistError: No backend of the job holds it.
        """
        return current_session().runtime.get_by_id(object_id)

    @classmethod
    async def a_get_by_id(cls: type[T], object_id: uuid.UUID | str) -> T:
        """Awaitable ``get_by_id``."""
        return await asyncio.to_thread(cls.get_by_id, object_id)

    def add_alias(self, alias: str) -> None:
        """Register one more alias for this object, in its dataset.

        Raises:
            ObjectNotRegisteredError: The object is volatile.
            AliasAlreadyExistError: The alias is taken.
        """
        self._dc_require_registered()
        current_session().runtime.add_alias(self, alias)

    async def a_add_alias(self, alias: str) -> None:
        """Awaitable ``add_alias``."""
        await asyncio.to_thread(self.add_alias, alias)

    @classmethod
    def delete_alias(cls, alias: str, dataset_name: str | None = None) -> None:
        """Remove an alias (the object itself stays).

        Raises:
            AliasDoesNotExistError: No such alias in the dataset.
        """
        current_session().runtime.delete_alias(alias, dataset_name)

    @classmethod
    async def a_delete_alias(cls, alias: str, dataset_name: str | None = None) -> None:
        """Awaitable ``delete_alias``."""
        await asyncio.to_thread(cls.delete_alias, alias, dataset_name)

    def get_aliases(self) -> set[str]:
        """Return the aliases of this object in its dataset."""
        self._dc_require_registered()
        return current_session().runtime.get_aliases(self)

    async def a_get_aliases(self) -> set[str]:
        """Awaitable ``get_aliases``."""
        return await asyncio.to_thread(self.get_aliases)

    def sync(self) -> None:
        """Refresh ``_dc_meta`` from the backend that holds the object.

        Raises:
            ObjectNotRegisteredError: The object is volatile.
        """
        self._dc_require_registered()
        current_session().runtime.sync(self)

    async def a_sync(self) -> None:
        """Awaitable ``sync``."""
        await asyncio.to_thread(self.sync)

    def move(
        self, backend_id: uuid.UUID | str, recursive: bool = False, remotes: bool = True
    ) -> None:
        """Move the object to another backend.

        Args:
            backend_id: Where to move it.
            recursive: Move every object it reaches as well.
            remotes: With ``recursive``, also move referents held by other
                backends than this object's.

        A volatile object is made persistent on ``backend_id`` instead.

        Raises:
            BackendDoesNotExistError: ``backend_id`` is not a backend of the job.
        """
        if not self._dc_is_registered:
            self.make_persistent(backend_id=backend_id)
            return
        current_session().runtime.move(self, backend_id, recursive, remotes)

    async def a_move(
        self, backend_id: uuid.UUID | str, recursive: bool = False, remotes: bool = True
    ) -> None:
        """Awaitable ``move``."""
        await asyncio.to_thread(self.move, backend_id, recursive, remotes)

    def new_version(
        self, backend_id: uuid.UUID | str | None = None, recursive: bool = False
    ) -> Any:
        """Return a new version: an independent copy with its own id.

        The version copies this object's own state; persistent objects it
        refers to are shared, not copied. Changes to the version reach the
        original only through ``consolidate_version()``. Versions of versions
        work: they remember the original and the chain of versions between.

        Args:
            backend_id: Where to keep the version; the object's backend when
                ``None``.
            recursive: Not supported: versions copy one object.

        Raises:
            ObjectNotRegisteredError: The object is volatile.
            BackendDoesNotExistError: ``backend_id`` is not a backend of the job.
        """
        self._dc_require_registered()
        if recursive:
            raise DataClayException(
                "new_version(recursive=True) is not supported: a version copies its "
                "object's own state and shares the objects it refers to; make "
                "versions of the referents you change"
            )
        return current_session().runtime.new_version(self, backend_id)

    async def a_new_version(
        self, backend_id: uuid.UUID | str | None = None, recursive: bool = False
    ) -> Any:
        """Awaitable ``new_version``."""
        return await asyncio.to_thread(self.new_version, backend_id, recursive)

    def consolidate_version(self, check: bool = False) -> None:
        """Write this version's state into its original.

        The original keeps its id and its backend. Afterwards the original, this
        version and every version between them read the consolidated state, and
        references to any of them lead to the original.

        Args:
            check: Refuse, with ``VersionConflictError``, when the original
                changed since this version was made (by a write, an active
                method or another consolidation); the original is then left
                untouched. Without it the last consolidation wins.

        Raises:
            ObjectIsNotVersionError: This is not a version, or it was
                consolidated or discarded already.
            VersionConflictError: ``check`` is set and the original changed.
        """
        self._dc_require_registered()
        current_session().runtime.consolidate_version(self, check)

    async def a_consolidate_version(self, check: bool = False) -> None:
        """Awaitable ``consolidate_version``."""
        await asyncio.to_thread(self.consolidate_version, check)

    def discard_version(self) -> None:
        """Throw this version away, freeing it on its backend.

        Raises:
            ObjectIsNotVersionError: This is not a version, or it was
                consolidated or discarded already.
        """
        self._dc_require_registered()
        current_session().runtime.discard_version(self)

    async def a_discard_version(self) -> None:
        """Awaitable ``discard_version``."""
        await asyncio.to_thread(self.discard_version)

    def _dc_require_registered(self) -> None:
        if not self._dc_is_registered:
            raise ObjectNotRegisteredError(self)


StorageObject = DataClayObject
