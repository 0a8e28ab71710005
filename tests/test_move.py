"""move(): one object, recursive, remotes, chains and cycles across backends."""

from __future__ import annotations

import gc
import itertools
import os
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from models import Custom, Inspector, Matrix, Node, Person, Saboteur, Shelf
from seed_model import Company, Employee

from dataclay_hpc.exceptions import BackendDoesNotExistError


def needs_backends(client, count):
    if len(client.get_backends()) < count:
        pytest.skip(f"needs {count} backends")


def chain_on(backend_ids, length=6):
    """A linked list whose node i lives on backend i % len(backend_ids)."""
    nodes = []
    for index in range(length):
        node = Node(index)
        node.make_persistent(backend_id=backend_ids[index % len(backend_ids)])
        nodes.append(node)
    for node, nxt in itertools.pairwise(nodes):
        node.next = nxt
    return nodes


def test_seed_move_one_object(client):
    employee = Employee("John", 1000.0)
    employee.make_persistent()

    # Get a list of available backend ids
    backend_ids = list(client.get_backends())

    # Move the object to the first backend id
    employee.move(backend_ids[0])

    assert employee._dc_meta.master_backend_id == backend_ids[0]
    assert employee.name == "John"


def test_seed_recursive_move(client):
    needs_backends(client, 3)
    backend_ids = list(client.get_backends())

    employee = Employee("John", 1000.0)
    employee.make_persistent(backend_id=backend_ids[0])

    company = Company("ABC", employee)
    company.make_persistent(backend_id=backend_ids[1])

    company.move(backend_ids[2], recursive=True)

    # employee has also moved
    employee.name  # forcing update of the backend_id  # noqa: B018
    assert employee._dc_meta.master_backend_id == backend_ids[2]


def test_seed_recursive_move_without_remotes(client):
    needs_backends(client, 3)
    backend_ids = list(client.get_backends())

    employee = Employee("John", 1000.0)
    employee.make_persistent(backend_id=backend_ids[0])

    company = Company("ABC", employee)
    company.make_persistent(backend_id=backend_ids[1])

    company.move(backend_ids[2], recursive=True, remotes=False)

    # employee is still in backend 0
    employee.name  # forcing update of the backend_id  # noqa: B018
    assert employee._dc_meta.master_backend_id == backend_ids[0]


def test_default_move_moves_only_the_object(client, backend_ids):
    tail = Node(2)
    head = Node(1, tail)
    head.make_persistent(backend_id=backend_ids[0])
    head.move(backend_ids[-1])
    assert head._dc_meta.master_backend_id == backend_ids[-1]
    assert tail.value == 2
    assert tail._dc_meta.master_backend_id == backend_ids[0]
    assert head.next is tail and head.total() == 3


def test_remotes_false_moves_only_referents_of_the_same_backend(client, backend_ids):
    far = Node(3)
    far.make_persistent(backend_id=backend_ids[-1])
    near = Node(2, far)
    head = Node(1, near)
    head.make_persistent(backend_id=backend_ids[0])
    target = backend_ids[1]
    head.move(target, recursive=True, remotes=False)
    for node, expected in ((head, target), (near, target), (far, backend_ids[-1])):
        node.value  # noqa: B018 - an access repairs the location
        assert node._dc_meta.master_backend_id == expected
    assert head.total() == 6


def test_a_chain_across_every_backend_moves_recursively(client, backend_ids):
    nodes = chain_on(backend_ids, length=3 * len(backend_ids))
    nodes[-1].next = nodes[0]  # and it is a cycle
    target = backend_ids[0]
    nodes[1].move(target, recursive=True)
    for node in nodes:
        node.value  # noqa: B018
        assert node._dc_meta.master_backend_id == target
    assert nodes[0].total() == sum(range(len(nodes)))


def test_moving_to_where_it_is_pulls_remote_referents(client, backend_ids):
    nodes = chain_on(backend_ids, length=2 * len(backend_ids))
    home = nodes[0]._dc_meta.master_backend_id
    nodes[0].move(home)  # not recursive: nothing at all
    nodes[1].value  # noqa: B018
    assert nodes[1]._dc_meta.master_backend_id != home
    nodes[0].move(home, recursive=True)
    for node in nodes:
        node.value  # noqa: B018
        assert node._dc_meta.master_backend_id == home


def test_every_proxy_finds_a_moved_object(client, backend_ids):
    person = Person("Val", 20)
    person.make_persistent(backend_id=backend_ids[0])
    holder = Node(0, None)
    holder.value = person  # a backend-side reference to it
    holder.make_persistent(backend_id=backend_ids[-1])
    for moves, backend_id in enumerate([*backend_ids[1:], backend_ids[0]]):
        person.move(backend_id)
        assert holder.value_age() == 20 + moves  # followed inside a backend
        assert person.birthday() == 21 + moves


def test_an_alias_finds_its_object_after_it_moved(client, backend_ids):
    # aliases of several names land on different home backends
    aliases = [f"wanderer-{uuid.uuid4().hex}" for _ in range(4 * len(backend_ids))]
    for index, alias in enumerate(aliases):
        person = Person(alias, index)
        person.make_persistent(alias=alias, backend_id=backend_ids[0])
        person.move(backend_ids[-1])
        person.move(backend_ids[index % len(backend_ids)])
    del person
    gc.collect()  # this process keeps no object for them now
    for index, alias in enumerate(aliases):
        found = Person.get_by_alias(alias)
        assert (found.name, found.age) == (alias, index)
        assert found._dc_meta.master_backend_id == backend_ids[index % len(backend_ids)]
        assert Person.get_by_alias(alias) is found


def warm_up_moves(backend_ids):
    """Move a Person between every two backends once, as the first move does."""
    for source, target in itertools.permutations(backend_ids, 2):
        Person("warm", 0).make_persistent(backend_id=source)
        person = Person("warm", 0)
        person.make_persistent(backend_id=source)
        person.move(target)


def test_each_request_after_a_move_finds_the_object(client, backend_ids):
    # a move is answered once the source has sent the object: the requests
    # right after it, here and from a backend, must find it at its target
    warm_up_moves(backend_ids)
    person = Person("Ada", 0)
    person.make_persistent(backend_id=backend_ids[0])
    holder = Node(0)
    holder.value = person
    holder.make_persistent(backend_id=backend_ids[0])  # a source every other move
    for step in range(1, 301):
        target = backend_ids[step % len(backend_ids)]
        person.move(target)
        assert person.age == step - 1
        assert person.birthday() == step
        assert holder.value_age() == step
        assert person._dc_meta.master_backend_id == target
        person.move(backend_ids[(step + 1) % len(backend_ids)])
        person.name = f"Ada {step}"  # a write right after a move
        assert person.name == f"Ada {step}"


def other_program(client, script: str, *args: str) -> subprocess.Popen:
    """Start a Python program that joins the job; lines in and out as text."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, DATACLAY_HPC_JOB=client.job_dir),
    )


def next_line(program: subprocess.Popen, deadline_s: float = 60) -> str:
    """The program's next line of output, within a deadline."""
    ready, _, _ = select.select([program.stdout], [], [], deadline_s)
    assert ready, f"the other program did not answer within {deadline_s} s"
    line = program.stdout.readline().strip()
    assert line, program.stderr.read()
    return line


def test_another_program_finds_an_object_right_after_it_moved(client, backend_ids):
    warm_up_moves(backend_ids)
    person = Person("Bea", 0)
    person.make_persistent(backend_id=backend_ids[0])
    script = (
        "import sys\n"
        "from dataclay_hpc import Client\n"
        "from models import Person\n"
        "with Client():\n"
        "    for line in sys.stdin:\n"
        "        object_id, age = line.split()\n"
        "        found = Person.get_by_id(object_id).age\n"
        "        print('ok' if found == int(age) else f'age {found}', flush=True)\n"
    )
    reader = other_program(client, script)
    try:
        answers = []
        for step in range(100):
            person.age = step
            person.move(backend_ids[(step + 1) % len(backend_ids)])
            reader.stdin.write(f"{person._dc_meta.id} {step}\n")
            reader.stdin.flush()
            answers.append(next_line(reader))
        reader.stdin.close()
        assert reader.wait(timeout=60) == 0, reader.stderr.read()
    finally:
        reader.kill()
        reader.wait(timeout=30)
    assert answers == ["ok"] * 100


def test_an_object_nobody_asks_for_reaches_its_target(client, backend_ids):
    # a move sent ahead is taken at its target even if no request misses it
    source, target = backend_ids[0], backend_ids[-1]
    warm_up_moves(backend_ids)
    inspector = Inspector()
    inspector.make_persistent(backend_id=target)
    for index in range(20):
        person = Person(f"unasked {index}", index)
        person.make_persistent(backend_id=source)
        person.move(target)
        object_id = str(person._dc_meta.id)
        deadline = time.monotonic() + 10
        while not inspector.holds(object_id):
            assert time.monotonic() < deadline, "the target did not take it in 10 s"
            time.sleep(0.001)
    assert person.age == 19


def thread_wakeups(pid: int) -> int:
    """How many times the threads of a process have given up the CPU."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                total += int(line.split()[1])
    return total


def test_a_failed_connection_for_arrivals_is_made_again(client, backend_ids):
    # the target dropped it: the next move waits for the target instead, and
    # the one after sends ahead on a new connection
    source, target = backend_ids[0], backend_ids[-1]
    warm_up_moves(backend_ids)
    inspector = Inspector()
    inspector.make_persistent(backend_id=target)
    person = Person("first", 0)
    person.make_persistent(backend_id=source)
    person.move(target)  # sent ahead: the connection for arrivals is made
    for round_ in range(3):
        assert inspector.drop_arrivals() >= 1
        for step in range(4):
            person = Person(f"after drop {round_}", step)
            person.make_persistent(backend_id=source)
            person.move(target)
            assert person._dc_meta.master_backend_id == target
            assert (person.name, person.birthday()) == (
                f"after drop {round_}",
                step + 1,
            )
            assert inspector.holds(str(person._dc_meta.id))


def test_backends_go_quiet_right_after_a_burst_of_moves(client, backend_ids):
    # while moves come, a backend looks for arrivals every millisecond; once
    # they stop, it must block again, not keep looking
    warm_up_moves(backend_ids)
    person = Person("burst", 0)
    person.make_persistent(backend_id=backend_ids[0])
    for step in range(500):
        person.move(backend_ids[step % len(backend_ids)])
    assert person.name == "burst"
    pids = [info.pid for info in client.get_backends().values()]
    time.sleep(0.1)
    before = [thread_wakeups(pid) for pid in pids]
    time.sleep(1.0)
    after = [thread_wakeups(pid) for pid in pids]
    for start, end in zip(before, after, strict=True):
        assert end - start < 100  # looking every millisecond: ~1000


def test_a_stale_location_of_a_nested_class_is_repaired(client, backend_ids):
    # a request that names its object by id names its class by path; the old
    # backend, which no longer holds the object, imports the class to answer
    book = Shelf.Book("Dune")
    book.make_persistent(backend_id=backend_ids[0])
    script = (
        "import sys\n"
        "from dataclay_hpc import Client\n"
        "from models import Shelf\n"
        "with Client():\n"
        "    book = Shelf.Book.get_by_id(sys.argv[1])\n"
        "    print(book.title, flush=True)\n"
        "    sys.stdin.readline()\n"
        "    print(book.title, book._dc_meta.master_backend_id, flush=True)\n"
    )
    reader = other_program(client, script, str(book._dc_meta.id))
    try:
        assert next_line(reader) == "Dune"
        book.move(backend_ids[-1])
        book.title = "Dune Messiah"
        reader.stdin.write("again\n")
        reader.stdin.flush()
        assert next_line(reader) == f"Dune Messiah {backend_ids[-1]}"
        assert reader.wait(timeout=60) == 0, reader.stderr.read()
    finally:
        reader.kill()
        reader.wait(timeout=30)


def test_a_flush_right_after_a_move_writes_the_object(client, backend_ids):
    warm_up_moves(backend_ids)
    person = Person("Cy", 0)
    person.make_persistent(backend_id=backend_ids[0])
    for step in range(1, 21):
        client.flush_all()
        person.age = step  # loaded again where it is
        person.move(backend_ids[step % len(backend_ids)])
        assert client.flush_all() == 1
        assert person.age == step


def test_an_object_its_target_failed_to_take_stays_at_its_source(client, backend_ids):
    source, target = backend_ids[0], backend_ids[-1]
    warm_up_moves(backend_ids)
    saboteur = Saboteur()
    saboteur.make_persistent(backend_id=target)
    person = Person("Dee", 7)
    person.make_persistent(backend_id=source)
    saboteur.refuse_next_store_of(str(person._dc_meta.id))
    person.move(target)  # answered before the target failed to take it
    assert person.name == "Dee"  # the target sends the request back
    assert person._dc_meta.master_backend_id == source
    assert person.birthday() == 8
    person.move(target)
    assert person._dc_meta.master_backend_id == target
    assert (person.name, person.age) == ("Dee", 8)


def test_a_volatile_object_is_made_persistent_where_it_is_moved(client, backend_ids):
    person = Person("Wes", 1)
    person.move(backend_ids[-1])
    assert person._dc_is_registered
    assert person._dc_meta.master_backend_id == backend_ids[-1]


def test_moving_to_an_unknown_backend_leaves_the_object_intact(client, backend_ids):
    head = Node(1, Node(2))
    head.make_persistent(backend_id=backend_ids[0])
    with pytest.raises(BackendDoesNotExistError):
        head.move(uuid.uuid4(), recursive=True)
    assert head._dc_meta.master_backend_id == backend_ids[0]
    assert head.total() == 3


def test_large_arrays_move_with_their_object(client, backend_ids):
    data = np.arange(3_000_000, dtype=np.float64)
    matrix = Matrix(data)
    matrix.make_persistent(backend_id=backend_ids[0])
    matrix.move(backend_ids[-1], recursive=True)
    assert matrix.sum() == pytest.approx(float(data.sum()))
    np.testing.assert_array_equal(matrix.data, data)


def test_one_object_moves_whatever_its_state_holds(client, backend_ids):
    source, target = backend_ids[0], backend_ids[-1]
    data = np.arange(2_000_000, dtype=np.float64)
    matrix = Matrix(data)  # a large array, out of band
    custom = Custom(7)  # __getstate__/__setstate__ of its own
    referent = Person("ref", 3)
    referent.make_persistent(backend_id=source)
    holder = Node(referent, None)  # refers to a persistent object
    flushed = Person("flushed", 9)  # in the store, not in memory, when it moves
    for obj in (matrix, custom, holder, flushed):
        obj.make_persistent(backend_id=source)
    version = flushed.new_version()
    client.flush_all()
    for obj in (matrix, custom, holder, flushed, version):
        obj.move(target)
        assert obj._dc_meta.master_backend_id == target
    np.testing.assert_array_equal(matrix.data, data)
    assert custom.read() == (7, 1)
    assert holder.value_age() == 3
    assert referent._dc_meta.master_backend_id == source  # not recursive
    assert (flushed.name, flushed.age) == ("flushed", 9)
    version.age = 10
    version.consolidate_version()
    assert flushed.age == 10
    assert flushed._dc_meta.master_backend_id == target


def test_100000_linked_nodes_move_recursively(client, backend_ids):
    head = None
    for value in range(100_000):
        head = Node(value, head)
    head.make_persistent(backend_id=backend_ids[0])
    head.move(backend_ids[-1], recursive=True)
    assert head.length() == 100_000
    last = head
    for _ in range(3):
        last = last.next
    last.value  # noqa: B018
    assert last._dc_meta.master_backend_id == backend_ids[-1]
    client.flush_all()
    assert head.total() == sum(range(100_000))
