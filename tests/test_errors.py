"""Aliases, look-ups and every bad input: a clear error, nothing half-made."""

from __future__ import annotations

import sys
import threading
import uuid

import pytest
from models import Node, Person

from dataclay_hpc.exceptions import (
    AliasAlreadyExistError,
    AliasDoesNotExistError,
    BackendDoesNotExistError,
    ClassImportError,
    DataClayException,
    ObjectDoesNotExistError,
    RemoteTraceback,
)


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4()}"


def test_aliases_add_find_list_and_delete(client):
    person = Person("Max", 3)
    alias = fresh("max")
    person.make_persistent(alias=alias)
    person.add_alias(alias + "-bis")
    assert person.get_aliases() == {alias, alias + "-bis"}
    Person.delete_alias(alias + "-bis")
    assert person.get_aliases() == {alias}
    with pytest.raises(AliasDoesNotExistError):
        Person.get_by_alias(alias + "-bis")
    assert Person.get_by_alias(alias, dataset_name="admin") is person


def test_an_unknown_alias_names_alias_and_dataset(client):
    with pytest.raises(
        AliasDoesNotExistError, match="'nope' does not exist in dataset 'admin'"
    ):
        Person.get_by_alias("nope")
    with pytest.raises(AliasDoesNotExistError, match="dataset 'other'"):
        Person.delete_alias("nope", dataset_name="other")


def test_a_taken_alias_leaves_no_object_behind(client, backend_ids):
    alias = fresh("taken")
    first = Person("One", 1)
    first.make_persistent(alias=alias)
    for backend_id in backend_ids:
        second = Person("Two", 2)
        with pytest.raises(
            AliasAlreadyExistError, match=f"admin/{alias} already exists"
        ):
            second.make_persistent(alias=alias, backend_id=backend_id)
        assert not second._dc_is_registered
        assert second.name == "Two"  # still a usable volatile object
        with pytest.raises(ObjectDoesNotExistError):
            Person.get_by_id(second._dc_meta.id)
    with pytest.raises(AliasAlreadyExistError):
        first.add_alias(alias)
    assert Person.get_by_alias(alias) is first


def test_an_unknown_backend_is_refused_with_the_valid_ids(client, backend_ids):
    person = Person("Ned", 1)
    bogus = uuid.uuid4()
    with pytest.raises(BackendDoesNotExistError, match=str(backend_ids[0])):
        person.make_persistent(backend_id=bogus)
    with pytest.raises(BackendDoesNotExistError, match="not-a-uuid"):
        person.make_persistent(backend_id="not-a-uuid")
    assert not person._dc_is_registered
    person.make_persistent(backend_id=str(backend_ids[0]))
    with pytest.raises(BackendDoesNotExistError):
        person.move(bogus)
    assert person.age == 1


def test_an_unknown_id_is_a_clear_error(client):
    with pytest.raises(ObjectDoesNotExistError, match="none of the job's"):
        Person.get_by_id(uuid.uuid4())
    with pytest.raises(ObjectDoesNotExistError, match="not a valid object id"):
        Person.get_by_id("garbage")


def test_errors_in_active_methods_reach_the_caller_with_the_remote_traceback(client):
    person = Person("Oli", 1)
    person.make_persistent()
    with pytest.raises(ValueError, match="bad thing") as info:
        person.fail("bad thing")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raised on backend rank" in str(cause) and "in fail" in str(cause)
    assert person.birthday() == 2  # the backend still serves


def test_a_value_that_cannot_be_pickled(client):
    person = Person("Pat", 1)
    person.make_persistent()
    with pytest.raises(DataClayException, match="cannot be pickled"):
        person.nickname = threading.Lock()
    with pytest.raises(DataClayException, match="cannot be sent back"):
        person.give_lock()
    assert person.nickname == "none"

    holder = Node(1, None)
    holder.lock = threading.Lock()  # transient: fine
    holder.make_persistent()
    unpicklable = Node(2, None)
    unpicklable.value = threading.Lock()
    with pytest.raises(DataClayException, match="cannot be pickled"):
        Node(0, unpicklable).make_persistent()
    assert not unpicklable._dc_is_registered


def test_a_class_the_backends_cannot_import(client, tmp_path):
    (tmp_path / "driver_only_model.py").write_text(
        "from dataclay_hpc import DataClayObject\n"
        "class Hidden(DataClayObject):\n"
        "    value: int\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from driver_only_model import Hidden

        hidden = Hidden()
        hidden.value = 1
        with pytest.raises(ClassImportError, match="driver_only_model") as info:
            hidden.make_persistent()
        assert "importable on every rank" in str(info.value)
        assert not hidden._dc_is_registered
        assert hidden.value == 1
    finally:
        sys.path.remove(str(tmp_path))
    person = Person("Que", 1)
    person.make_persistent()
    assert person.age == 1
