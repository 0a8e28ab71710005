"""A backend's store: one HDF5 file holding the state of the objects it flushed.

Layout, readable with plain h5py::

    /states            uint8 dataset: pickled states, one after another
    /index             table, one row per object: id, offset and length of its
                       state in /states, dotted class path, number of arrays
    /arrays/<id>/<i>   the i-th numeric numpy array of an object, native

Numeric numpy arrays held by an object are native HDF5 datasets and come back
as numpy arrays; everything else is pickled, with references (never copies) to
other persistent objects. States are appended in one write per flush: an HDF5
group per object costs ~0.6 ms, which made flushing 100 000 small objects take
a minute. Space left by rewritten states is reclaimed when it exceeds the live
data. HDF5 is not thread-safe, so one lock guards the file.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import h5py
import numpy

from .object import PICKLE_DISPATCH
from .serialization import _Pickler, class_import_error, current_pickler

__all__ = ["Store"]

logger = logging.getLogger(__name__)

# numpy kinds h5py stores natively: bool, signed, unsigned, float, complex
_NATIVE_KINDS = frozenset("biufc")
_INDEX_DTYPE = numpy.dtype(
    [
        ("id", "S36"),
        ("offset", "<u8"),
        ("length", "<u8"),
        ("class", h5py.string_dtype()),
        ("arrays", "<u4"),
    ]
)
# rewrite /states once dead bytes exceed live bytes by this much
_COMPACT_SLACK_BYTES = 1 << 20
# states are read in blocks and a few blocks are kept: objects flushed
# together sit together, and reading them one HDF5 slice at a time cost
# ~100 us each (12 s to walk 100 000 reloaded objects)
_BLOCK_BYTES = 4 << 20
_CACHED_BLOCKS = 8


_loading = threading.local()


def _stored_array(index: int) -> numpy.ndarray:
    return _loading.arrays[index]


def _reduce_array(array: numpy.ndarray) -> Any:
    pickler = current_pickler()
    if isinstance(pickler, _StorePickler) and array.dtype.kind in _NATIVE_KINDS:
        pickler.arrays.append(array)
        return _stored_array, (len(pickler.arrays) - 1,)
    return array.__reduce_ex__(5)


class _StorePickler(_Pickler):
    """Pickles one state at a time; numeric arrays are set aside as datasets."""

    def __init__(self, register: Callable[[Any], None]) -> None:
        self.file = io.BytesIO()
        # by exact type, like the message picklers, plus numpy arrays
        self.dispatch_table = {**PICKLE_DISPATCH, numpy.ndarray: _reduce_array}
        # a store pickle stands alone: no out-of-band buffers
        super().__init__(self.file, None, register)
        self.arrays: list[numpy.ndarray] = []

    def pickle_state(self, state: Any) -> tuple[bytes, list[numpy.ndarray]]:
        self.file.seek(0)
        self.file.truncate()
        self.clear_memo()
        self.arrays = []
        self.dump(state)
        return self.file.getvalue(), self.arrays


class Store:
    """The HDF5 file of one backend.

    ``write`` keeps a state in memory; ``flush`` puts every written state in
    the file. ``read`` sees both.

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
        if "states" not in self._file:
            self._file.create_dataset(
                "states", shape=(0,), maxshape=(None,), dtype=numpy.uint8, chunks=True
            )
        self._states = self._file["states"]
        # object id -> (offset, length, class path, number of arrays)
        self._index: dict[uuid.UUID, tuple[int, int, str, int]] = {}
        if "index" in self._file:
            for row in self._file["index"][()]:
                self._index[uuid.UUID(row["id"].decode())] = (
                    int(row["offset"]),
                    int(row["length"]),
                    _text(row["class"]),
                    int(row["arrays"]),
                )
        self._pending: dict[uuid.UUID, tuple[str, bytes, list[numpy.ndarray]]] = {}
        self._blocks: dict[int, bytes] = {}
        logger.info("store %s opened (%d objects)", path, len(self._index))

    def write(self, object_id: uuid.UUID, class_path: str, state: Any) -> None:
        """Take one object's state; it reaches the file at the next ``flush``."""
        self.write_many([(object_id, class_path, state)])

    def write_many(self, states: Iterable[tuple[uuid.UUID, str, Any]]) -> None:
        """Take many ``(object id, class path, state)``; see ``write``."""
        pickler = _StorePickler(self._register)
        taken = {}
        for object_id, class_path, state in states:
            data, arrays = pickler.pickle_state(state)
            taken[object_id] = (class_path, data, arrays)
        with self._lock:
            self._pending.update(taken)

    def read(self, object_id: uuid.UUID) -> Any:
        """Return the state written for ``object_id``.

        Raises:
            KeyError: The store has no such object.
        """
        with self._lock:
            pending = self._pending.get(object_id)
            if pending is not None:
                _, data, arrays = pending
            else:
                offset, length, _, count = self._index[object_id]
                data = self._read_states(offset, length)
                group = self._file["arrays"][str(object_id)] if count else None
                arrays = [group[str(i)][()] for i in range(count)] if group else []
        _loading.arrays = arrays
        try:
            return pickle.loads(data)
        except (ImportError, AttributeError) as exc:
            raise class_import_error(exc) from exc
        finally:
            _loading.arrays = None

    def delete(self, object_id: uuid.UUID) -> None:
        """Forget an object (its bytes are reclaimed by a later compaction)."""
        with self._lock:
            self._pending.pop(object_id, None)
            previous = self._index.pop(object_id, None)
            if previous is not None and previous[3]:
                self._drop_arrays(object_id)

    def __contains__(self, object_id: uuid.UUID) -> bool:
        with self._lock:
            return object_id in self._pending or object_id in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index.keys() | self._pending.keys())

    def flush(self) -> None:
        """Write every state taken since the last flush to the file."""
        with self._lock:
            if self._pending:
                self._append(self._pending)
                self._pending = {}
            self._compact_if_sparse()
            self._write_index()
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        if not self._file.id.valid:
            return
        self.flush()
        with self._lock:
            self._file.close()
        logger.info("store %s closed", self.path)

    # -- under the lock ----------------------------------------------------------

    def _read_states(self, offset: int, length: int) -> bytes:
        first, last = offset // _BLOCK_BYTES, (offset + length - 1) // _BLOCK_BYTES
        if length > _BLOCK_BYTES or first != last:
            return self._states[offset : offset + length].tobytes()
        block = self._blocks.get(first)
        if block is None:
            if len(self._blocks) >= _CACHED_BLOCKS:
                del self._blocks[next(iter(self._blocks))]
            start = first * _BLOCK_BYTES
            block = self._states[start : start + _BLOCK_BYTES].tobytes()
            self._blocks[first] = block
        start = offset - first * _BLOCK_BYTES
        return block[start : start + length]

    def _append(self, states: dict[uuid.UUID, tuple[str, bytes, list]]) -> None:
        self._blocks.clear()
        start = self._states.shape[0]
        blob = b"".join(data for _, data, _ in states.values())
        self._states.resize((start + len(blob),))
        if blob:
            self._states[start:] = numpy.frombuffer(blob, dtype=numpy.uint8)
        offset = start
        for object_id, (class_path, data, arrays) in states.items():
            previous = self._index.get(object_id)
            if previous is not None and previous[3]:
                self._drop_arrays(object_id)
            if arrays:
                group = self._file.require_group("arrays").create_group(str(object_id))
                for index, array in enumerate(arrays):
                    group.create_dataset(str(index), data=array)
            self._index[object_id] = (offset, len(data), class_path, len(arrays))
            offset += len(data)

    def _drop_arrays(self, object_id: uuid.UUID) -> None:
        arrays = self._file.get("arrays")
        if arrays is not None and str(object_id) in arrays:
            del arrays[str(object_id)]

    def _compact_if_sparse(self) -> None:
        live = sum(length for _, length, _, _ in self._index.values())
        if self._states.shape[0] - live <= max(live, _COMPACT_SLACK_BYTES):
            return
        states = {
            object_id: (class_path, self._states[o : o + n].tobytes(), count)
            for object_id, (o, n, class_path, count) in self._index.items()
        }
        self._blocks.clear()
        self._states.resize((0,))
        offset = 0
        blob = b"".join(data for _, data, _ in states.values())
        self._states.resize((len(blob),))
        if blob:
            self._states[:] = numpy.frombuffer(blob, dtype=numpy.uint8)
        for object_id, (class_path, data, count) in states.items():
            self._index[object_id] = (offset, len(data), class_path, count)
            offset += len(data)
        logger.debug("store %s compacted to %d bytes", self.path, len(blob))

    def _write_index(self) -> None:
        table = numpy.empty(len(self._index), dtype=_INDEX_DTYPE)
        if self._index:
            rows = list(zip(*self._index.values(), strict=True))
            table["id"] = [str(object_id).encode() for object_id in self._index]
            table["offset"], table["length"] = rows[0], rows[1]
            table["class"], table["arrays"] = rows[2], rows[3]
        if "index" in self._file:
            del self._file["index"]
        self._file.create_dataset("index", data=table)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
