"""flush_all writes objects to the HDF5 store; the next access reloads them."""

from __future__ import annotations

import glob
import os
import uuid

import h5py
import numpy as np
import pytest
from models import Company, Custom, Guarded, Matrix, Node, Person

from dataclay_hpc import Client


def test_flushed_objects_reload_on_every_kind_of_access(client, backend_ids):
    person = Person("Rae", 50)
    person.make_persistent(backend_id=backend_ids[0])
    company = Company("Flushers")
    company.make_persistent(backend_id=backend_ids[-1])
    company.add(person)
    chain = Node(1, Node(2, Node(3)))
    chain.make_persistent(backend_id=backend_ids[0])
    custom = Custom(5)
    custom.make_persistent()

    assert client.flush_all() >= 6

    assert person.name == "Rae"  # attribute read
    assert company.ages() == [50]  # active method, reference followed inside
    assert chain.total() == 6  # references followed inside one backend
    person.age = 51  # write to a flushed object
    client.flush_all()
    assert person.birthday() == 52
    assert custom.read() == (5, 1)  # __setstate__ ran on reload
    client.flush_all()
    person.move(backend_ids[-1])  # a move reloads first
    assert (person.name, person.age) == ("Rae", 52)


def test_flush_keeps_objects_created_on_backends(client):
    company = Company("Made-there")
    company.make_persistent()
    hired = company.hire("Sue", 20)
    client.flush_all()
    assert hired.name == "Sue"
    assert company.ages() == [20]


def test_store_is_one_hdf5_file_per_backend_with_native_arrays(tmp_path):
    storage = tmp_path / "store"
    data = np.arange(12, dtype=np.float64).reshape(3, 4)
    with Client(backends=2, storage=str(storage)) as client:
        backends = client.get_backends()
        matrix = Matrix(data, "grid")
        matrix.make_persistent(backend_id=list(backends)[1])
        object_id = str(matrix._dc_meta.id)
        client.flush_all()
        assert matrix.sum() == pytest.approx(data.sum())
        client.flush_all()

    files = sorted(os.path.basename(p) for p in glob.glob(str(storage / "*.h5")))
    assert files == ["backend-1.h5", "backend-2.h5"]
    with h5py.File(storage / "backend-2.h5", "r") as store:
        index = store["index"][()]
        row = index[index["id"] == object_id.encode()][0]
        assert row["class"].decode() == "models.Matrix" and row["arrays"] == 1
        np.testing.assert_array_equal(store["arrays"][object_id]["0"][()], data)
        state = store["states"][row["offset"] : row["offset"] + row["length"]]
        assert state.dtype == np.uint8 and len(state) == row["length"] > 0


def test_large_arrays_round_trip_through_attributes(client):
    data = np.random.default_rng(0).random(2_000_000)
    matrix = Matrix(data)
    matrix.make_persistent()
    back = matrix.data
    np.testing.assert_array_equal(back, data)
    matrix.data = data * 2
    np.testing.assert_array_equal(matrix.data, data * 2)
    client.flush_all()
    assert matrix.sum() == pytest.approx(float((data * 2).sum()))


def test_an_active_method_reloads_before_touching_transient_state(client):
    guarded = Guarded()
    guarded.make_persistent()
    assert guarded.increment() == 1
    client.flush_all()
    assert guarded.increment() == 2  # uses self.lock before any annotated attribute


def test_the_store_reopens_and_reclaims_rewritten_space(tmp_path):
    from dataclay_hpc.store import Store

    path = str(tmp_path / "backend-1.h5")
    ids = [uuid.uuid4() for _ in range(50)]
    store = Store(path, register=lambda obj: None)
    for round_ in range(40):
        for index, object_id in enumerate(ids):
            store.write(
                object_id, "pkg.Cls", {"payload": bytes(10_000), "n": (round_, index)}
            )
        store.flush()
    store.write(ids[0], "pkg.Cls", {"grid": np.ones((4, 4))})
    store.close()

    reopened = Store(path, register=lambda obj: None)
    assert len(reopened) == 50
    assert reopened.read(ids[7])["n"] == (39, 7)
    np.testing.assert_array_equal(reopened.read(ids[0])["grid"], np.ones((4, 4)))
    reopened.close()
    with h5py.File(path, "r") as raw:
        assert raw["states"].shape[0] < 8 * 50 * 10_100  # 40 rounds wrote 20 MB
