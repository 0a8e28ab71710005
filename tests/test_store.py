"""flush_all writes objects to the HDF5 store; the next access reloads them."""

from __future__ import annotations

import glob
import os

import h5py
import numpy as np
import pytest
from models import Company, Custom, Matrix, Node, Person

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
        group = store["objects"][object_id]
        assert group.attrs["class"] == "models.Matrix"
        np.testing.assert_array_equal(group["array_0"][()], data)
        assert group["state"].dtype == np.uint8


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
