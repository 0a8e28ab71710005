"""A backend's store: one HDF5 file holding the state of the objects it flushed.

Layout, readable with plain h5py::

    /objects/<object id>            group, attribute "class" = dotted class path
    /objects/<object id>/state      uint8 dataset: the pickled state
    /objects/<object id>/array_<i>  native dataset for the i-th numpy array

Numeric numpy arrays held by an object are written as native HDF5 datasets and
come back as numpy arrays; everything else is pickled. References to other
persistent objects are stored as references, never as copies. HDF5 is not
thread-safe, so one lock guards the file.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
import uuid
from collections.abc import Callable
from typing import Any

import h5py
import numpy

from .serialization import _Pickler, class_import_error

__all__ = ["Store"]

logger = logging.getLogger(__name__)

# numpy kinds h5py stores natively: bool, signed, unsigned, float, complex
_NATIVE_KINDS = frozenset("biufc")


class _StorePickler(_Pickler):
    def __init__(self, file: io.BytesIO, register: Callable[[Any], None]) -> None:
        # a store pickle stands alone: no out-of-band buffers
        super().__init__(file, None, register)
        self.arrays: list[numpy.ndarray] = []

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is numpy.ndarray and obj.dtype.kind in _NATIVE_KINDS:
            self.arrays.append(obj)
            return len(self.arrays) - 1
        return None


class _StoreUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arrays: list[numpy.ndarray]) -> None:
        super().__init__(file)
        self._arrays = arrays

    def persistent_load(self, pid: Any) -> Any:
        return self._arrays[pid]


class Store:
    """The HDF5 file of one backend.

    Args:
        path: The file; created (with its folder) if missing.
        register: Called for a volatile object met while pickling a state, so it
            becomes persistent on the store's backend.
    """

    def __init__(self, path: str, register: Callable[[Any], None]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._register = register
        self._lock = threading.Lock()
        self._file = h5py.File(path, "a")
        self._objects = self._file.require_group("objects")
        logger.info("store %s opened (%d objects)", path, len(self._objects))

    def write(self, object_id: uuid.UUID, class_path: str, state: Any) -> None:
        """Write (or overwrite) one object's state."""
        file = io.BytesIO()
        pickler = _StorePickler(file, self._register)
        pickler.dump(state)
        data = numpy.frombuffer(file.getbuffer(), dtype=numpy.uint8)
        key = str(object_id)
        with self._lock:
            if key in self._objects:
                del self._objects[key]
            group = self._objects.create_group(key)
            group.attrs["class"] = class_path
            group.create_dataset("state", data=data)
            for index, array in enumerate(pickler.arrays):
                group.create_dataset(f"array_{index}", data=array)

    def read(self, object_id: uuid.UUID) -> Any:
        """Return the state written for ``object_id``.

        Raises:
            KeyError: The store has no such object.
        """
        key = str(object_id)
        with self._lock:
            group = self._objects[key]
            data = group["state"][()]
            count = sum(1 for name in group if name.startswith("array_"))
            arrays = [group[f"array_{i}"][()] for i in range(count)]
        try:
            return _StoreUnpickler(io.BytesIO(data.tobytes()), arrays).load()
        except (ImportError, AttributeError) as exc:
            raise class_import_error(exc) from exc

    def __contains__(self, object_id: uuid.UUID) -> bool:
        with self._lock:
            return str(object_id) in self._objects

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    def flush(self) -> None:
        """Push buffered writes to the file."""
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            if self._file.id.valid:
                self._file.flush()
                self._file.close()
                logger.info("store %s closed", self.path)
