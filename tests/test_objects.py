"""Objects, proxies, active methods and graphs on a real job."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import numpy as np
import pytest
from models import Company, Custom, Label, Node, Person

from dataclay_hpc import Client, DataClayObject, StorageObject, serialization
from dataclay_hpc.exceptions import ObjectNotRegisteredError


def test_annotated_attributes_persist_and_others_stay_local(client):
    person = Person("Ann", 30)
    person.make_persistent()

    assert person._dc_is_registered and not person._dc_is_local
    assert "name" not in person.__dict__
    assert person.name == "Ann" and person.age == 30
    assert person.nickname == "none"  # class-level default
    assert person.scratch == "transient"  # never sent to the backend
    assert person.get_scratch() is None

    person.age = 31
    person.nickname = "annie"
    assert (person.age, person.nickname) == (31, "annie")


def test_active_methods_run_on_the_backend_that_holds_the_object(client, backend_ids):
    backends = client.get_backends()
    for backend_id in backend_ids:
        person = Person("Bo", 1)
        person.make_persistent(backend_id=backend_id)
        pid, local_there = person.where()
        assert pid == backends[backend_id].pid
        assert local_there is True
        assert person._dc_meta.master_backend_id == backend_id
    assert person.birthday() == 2
    assert person.plain_method() == "Bo (2)"  # not active: runs here, reads remotely


def test_async_active_methods(client):
    person = Person("cy", 5)
    person.make_persistent()
    assert asyncio.run(person.shout()) == "CY"


def test_objects_created_in_an_active_method_live_on_that_backend(client, backend_ids):
    company = Company("ACME")
    company.make_persistent(backend_id=backend_ids[-1])
    hired = company.hire("Dan", 40)
    assert hired._dc_is_registered and not hired._dc_is_local
    assert hired._dc_meta.master_backend_id == backend_ids[-1]
    assert hired.name == "Dan"
    assert company.ages() == [40]


def test_volatile_arguments_and_assigned_values_become_persistent(client, backend_ids):
    company = Company("Initech")
    company.make_persistent(backend_id=backend_ids[0])
    newcomer = Person("Eve", 22)
    assert company.add(newcomer) == 1
    assert newcomer._dc_is_registered
    assert newcomer._dc_meta.master_backend_id == backend_ids[0]
    assert newcomer.age == 22

    second = Person("Fay", 33)
    company.people = [newcomer, second]
    assert second._dc_is_registered
    assert second._dc_meta.master_backend_id == backend_ids[0]
    assert company.ages() == [22, 33]


def test_nested_calls_across_backends(client, backend_ids):
    people = []
    for index, backend_id in enumerate(backend_ids):
        person = Person(f"p{index}", index)
        person.make_persistent(backend_id=backend_id)
        people.append(person)
    company = Company("spread")
    company.make_persistent(backend_id=backend_ids[0])
    for person in people:
        company.add(person)
    assert company.birthdays() == [i + 1 for i in range(len(backend_ids))]
    assert company.where_people() == backend_ids
    assert [p.age for p in people] == [i + 1 for i in range(len(backend_ids))]


def test_make_persistent_takes_the_whole_volatile_graph_to_one_backend(
    client, backend_ids
):
    tail = Node(3)
    head = Node(1, Node(2, tail))
    head.make_persistent(backend_id=backend_ids[1])
    for node in (head, tail):
        assert node._dc_is_registered
        assert node._dc_meta.master_backend_id == backend_ids[1]
    assert head.length() == 3
    assert head.next.next is tail


def test_cycles_persist(client):
    first = Node(1)
    second = Node(2, first)
    first.next = second
    first.make_persistent()
    assert first.next.next is first
    assert first.total() == 3


def test_a_graph_of_100000_objects_persists_without_recursion_limits(client):
    head = None
    for value in range(100_000):
        head = Node(value, head)
    head.make_persistent()
    assert head.length() == 100_000
    assert head.total() == sum(range(100_000))


def test_one_python_object_per_id(client):
    person = Person("Gil", 9)
    person.make_persistent(alias=f"gil-{uuid.uuid4()}")
    alias = person.get_aliases().pop()
    assert Person.get_by_alias(alias) is person
    assert Person.get_by_id(person._dc_meta.id) is person
    assert Person.get_by_id(str(person._dc_meta.id)) is person


def test_equality_and_hash_follow_the_id(client):
    a, b = Person("a", 1), Person("a", 1)
    assert a != b and a == a  # volatile: identity
    a.make_persistent()
    assert hash(a) == hash(a._dc_meta.id)
    assert len({a, a}) == 1


def test_metadata_and_flags(client, backend_ids):
    volatile = Person("Hal", 2)
    assert volatile._dc_is_local and not volatile._dc_is_registered
    assert volatile.getID() is None
    volatile.make_persistent(backend_id=backend_ids[0])
    meta = volatile._dc_meta
    assert isinstance(meta.id, uuid.UUID)
    assert meta.master_backend_id == backend_ids[0]
    assert meta.dataset_name == "admin"
    assert meta.original_object_id is None and meta.versions_object_ids == []
    assert json.loads(volatile.getID())["id"] == str(meta.id)
    meta.master_backend_id = None
    volatile.sync()
    assert volatile._dc_meta.master_backend_id == backend_ids[0]


def test_get_backends_is_ordered_by_rank_and_describes_each(client):
    backends = client.get_backends()
    ranks = [info.rank for info in backends.values()]
    assert ranks == sorted(ranks) == list(range(1, len(backends) + 1))
    for backend_id, info in backends.items():
        assert info.id == backend_id
        assert info.host and info.address[1] > 0 and info.pid > 0
        assert info.pid != os.getpid()


def test_make_persistent_on_a_registered_object_moves_it_and_adds_the_alias(
    client, backend_ids
):
    person = Person("Ike", 7)
    person.make_persistent(backend_id=backend_ids[0])
    alias = f"ike-{uuid.uuid4()}"
    person.make_persistent(alias=alias, backend_id=backend_ids[-1])
    assert person._dc_meta.master_backend_id == backend_ids[-1]
    assert person.where()[0] == client.get_backends()[backend_ids[-1]].pid
    assert Person.get_by_alias(alias) is person
    assert person.age == 7


def test_a_stale_location_is_repaired_on_the_next_access(client, backend_ids):
    person = Person("Jo", 4)
    person.make_persistent(backend_id=backend_ids[0])
    person.move(backend_ids[1])
    person._dc_meta.master_backend_id = backend_ids[0]  # as another process saw it
    assert person.age == 4
    assert person._dc_meta.master_backend_id == backend_ids[1]


def test_awaitable_twins(client, backend_ids):
    async def main():
        person = Person("Kim", 8)
        alias = f"kim-{uuid.uuid4()}"
        await person.a_make_persistent(alias=alias, backend_id=backend_ids[0])
        assert await Person.a_get_by_alias(alias) is person
        assert await Person.a_get_by_id(person._dc_meta.id) is person
        await person.a_add_alias(alias + "-2")
        assert await person.a_get_aliases() == {alias, alias + "-2"}
        await Person.a_delete_alias(alias + "-2")
        await person.a_move(backend_ids[-1])
        await person.a_sync()
        assert person._dc_meta.master_backend_id == backend_ids[-1]

    asyncio.run(main())


def test_getstate_and_setstate_are_honoured(client):
    custom = Custom(11)
    custom.make_persistent()
    assert custom.read() == (11, 1)


def test_storage_object_is_the_same_class():
    assert StorageObject is DataClayObject


def test_operations_on_volatile_objects_raise(client):
    person = Person("Lu", 1)
    for call in (
        person.add_alias,
        lambda _: person.get_aliases(),
        lambda _: person.sync(),
    ):
        with pytest.raises(ObjectNotRegisteredError, match="make_persistent"):
            call("x")


def test_an_argument_that_comes_back_is_the_same_object(client):
    person = Person("Rex", 1)
    person.make_persistent()
    newcomer = Person("Sam", 2)
    assert person.echo(newcomer) is newcomer
    assert person.echo([newcomer, newcomer]) == [newcomer, newcomer]


@pytest.mark.parametrize(
    "value",
    [
        7,
        2.5,
        "text",
        b"bytes",
        None,
        True,
        uuid.UUID(int=12345),
        (1, "a", None),
        [1, 2.0, "b"],
        {"k": 1, 2: b"v"},
        [[1, 2], [3]],
        {"k": [1, {"deep": 2}]},
        (),
        {},
        list(range(1000)),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_plain_arguments_arrive_as_sent(client, value):
    person = Person("Ann", 30)
    person.make_persistent()
    back = person.echo(value)
    assert back == value
    assert type(back) is type(value)


def test_arguments_that_hold_objects_arrive_as_the_objects(client, backend_ids):
    person = Person("Ann", 30)
    person.make_persistent(backend_id=backend_ids[0])
    other = Person("Bob", 40)
    other.make_persistent(backend_id=backend_ids[-1])
    newcomer = Person("Cid", 50)
    label = Label("tag")
    label.owner = other
    for value in ([other], (1, other), {"who": other}, {other.name: [newcomer]}):
        assert person.echo(value) == value
    assert newcomer._dc_is_registered and newcomer.name == "Cid"
    back = person.echo(label)
    assert type(back) is Label and back.owner is other
    array = np.arange(5)
    assert (person.echo(array) == array).all()


def test_no_persistent_object_passes_for_a_plain_argument(client):
    person = Person("Ann", 30)
    person.make_persistent()
    volatile = Person("Bob", 40)
    label = Label("tag")
    plain = serialization.plain_arguments
    assert plain((1, "a", uuid.UUID(int=1), (1, 2), [3], {"k": "v"}, (), {}))
    for args in (
        (person,),
        (volatile,),
        ([person],),
        ((1, volatile),),
        ({"k": person},),
        ({person: 1},),
        ([[person]],),
        ([[1]],),  # two levels deep: the job's pickler looks inside
        (label,),
        (np.arange(3),),
        ({1, 2},),
        (list(range(257)),),  # longer than it pays to look into
    ):
        assert not plain(args), args


def test_two_clients_of_one_process_share_the_embedded_job(client):
    with Client(backends=len(client.get_backends()), storage=client.storage) as other:
        assert other.get_backends() == client.get_backends()


def test_object_ids_are_distinct_random_version_4_uuids():
    ids = [Person(f"id{i}", i)._dc_meta.id for i in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(i.version == 4 and i.variant == uuid.RFC_4122 for i in ids)
    # hashable and equal like any UUID built from the same value
    assert uuid.UUID(str(ids[0])) == ids[0] and hash(uuid.UUID(int=ids[0].int)) == (
        hash(ids[0])
    )


def test_a_forked_child_draws_other_object_ids_than_its_parent():
    Person("warm", 0)  # the parent holds drawn ids now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        child_ids = ",".join(str(Person("c", 0)._dc_meta.id) for _ in range(100))
        os.write(write, child_ids.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(map(uuid.UUID, pipe.read().split(",")))
    os.waitpid(pid, 0)
    parent = {Person("p", 0)._dc_meta.id for _ in range(100)}
    assert len(child) == 100 and not child & parent
