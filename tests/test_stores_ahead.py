"""make_persistent without an alias sent ahead of its answer, and its guarantees."""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from conftest import DATACLAY_HPC, run
from models import Node, Person

from dataclay_hpc import Client, ContextThreadPoolExecutor, transport
from dataclay_hpc.exceptions import ClassImportError


def _posted_now(client: Client) -> int:
    """The most unanswered stores on any one connection of this process."""
    return max(c.posted for c in client.runtime._all_connections)


def test_stores_sent_ahead_arrive_whole_and_in_place(client, backend_ids):
    people = {b: [Person(f"p{i}", i) for i in range(500)] for b in backend_ids}
    most_posted = 0
    for backend_id, group in people.items():
        Person("first", 0).make_persistent(backend_id=backend_id)  # class known
        for person in group:
            person.make_persistent(backend_id=backend_id)
            most_posted = max(most_posted, _posted_now(client))
    # the calls did not wait: answers were still to come while later ones went
    assert most_posted > 1
    assert most_posted <= transport.MAX_POSTED
    for backend_id, group in people.items():
        for i, person in enumerate(group):
            assert person._dc_is_registered and not person._dc_is_local
            assert person._dc_meta.master_backend_id == backend_id
            assert (person.name, person.age) == (f"p{i}", i)
    assert _posted_now(client) == 0


def test_plain_containers_and_arrays_travel_ahead(client, backend_ids):
    target = backend_ids[-1]
    Node(0, None).make_persistent(backend_id=target)
    payloads = [
        [1, 2.5, "x", None],
        {"a": (1, 2), "b": {3, 4}},
        np.arange(10.0),
        frozenset({b"z"}),
    ]
    nodes = [Node(value, None) for value in payloads]
    chain = Node(1, Node(2, Node(3, None)))  # volatile referents go with it
    for node in [*nodes, chain]:
        node.make_persistent(backend_id=target)
    assert nodes[0].value == payloads[0]
    assert nodes[1].value == payloads[1]
    np.testing.assert_array_equal(nodes[2].value, payloads[2])
    assert nodes[3].value == payloads[3]
    assert chain.length() == 3
    assert chain.next._dc_meta.master_backend_id == target


def test_another_thread_sees_a_store_as_soon_as_the_call_returned(client, backend_ids):
    handed: queue.Queue = queue.Queue()
    for backend_id in backend_ids:
        Person("warm", 0).make_persistent(backend_id=backend_id)

    def maker() -> None:
        for i in range(300):
            person = Person(f"h{i}", i)
            person.make_persistent(backend_id=backend_ids[i % len(backend_ids)])
            handed.put(person)
        handed.put(None)

    seen = []
    with ContextThreadPoolExecutor(1) as pool:
        done = pool.submit(maker)
        while (person := handed.get(timeout=60)) is not None:
            # another thread, another connection: no "does not exist" race
            seen.append((person.name, Person.get_by_id(person._dc_meta.id).age))
        done.result(timeout=60)
    assert seen == [(f"h{i}", i) for i in range(300)]


def test_a_backend_reading_a_store_just_sent_to_another_finds_it(client, backend_ids):
    first, last = backend_ids[0], backend_ids[-1]
    Person("warm", 0).make_persistent(backend_id=first)
    Node(0, None).make_persistent(backend_id=last)
    for i in range(200):
        person = Person("n", i)
        person.make_persistent(backend_id=first)
        node = Node(person, None)
        node.make_persistent(backend_id=last)
        assert node.value_age() == i  # the backend of node asks the one of person


def test_values_a_backend_may_not_import_still_fail_at_the_call(client, tmp_path):
    (tmp_path / "driver_only_values.py").write_text("class Secret:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from driver_only_values import Secret

        Person("warm", 0).make_persistent()
        person = Person("Ann", 3)
        person.nickname = Secret()
        with pytest.raises(ClassImportError, match="driver_only_values"):
            person.make_persistent()
        assert not person._dc_is_registered
        assert person.age == 3
    finally:
        sys.path.remove(str(tmp_path))


def test_a_long_request_of_one_thread_does_not_hold_up_another(client, backend_ids):
    sleeper = Person("sleeper", 1)
    sleeper.make_persistent(backend_id=backend_ids[0])
    reader = Person("reader", 2)
    reader.make_persistent(backend_id=backend_ids[-1])
    for _ in range(3):
        posted = threading.Event()

        def post_then_nap(posted: threading.Event = posted) -> None:
            # most of what one connection sends ahead: covering it takes a while
            for i in range(transport.MAX_POSTED - 6):
                Person("n", i).make_persistent(backend_id=backend_ids[0])
            posted.set()
            sleeper.nap(1.5)

        with ContextThreadPoolExecutor(2) as pool:
            napping = pool.submit(post_then_nap)
            assert posted.wait(30)
            start = time.monotonic()
            assert reader.age == 2  # covers the other thread's stores first
            waited = time.monotonic() - start
            napping.result(timeout=30)
        assert waited < 1.0, f"a read waited {waited:.2f} s behind another thread"


def test_many_threads_store_ahead_at_once(client, backend_ids):
    def make(tag: int) -> list[Person]:
        made = [Person(f"{tag}-{i}", i) for i in range(200)]
        for person in made:
            person.make_persistent(backend_id=backend_ids[tag % len(backend_ids)])
        return made

    with ContextThreadPoolExecutor(8) as pool:
        groups = [
            f.result(timeout=120) for f in [pool.submit(make, t) for t in range(8)]
        ]
    for tag, made in enumerate(groups):
        assert [p.age for p in made] == list(range(200))
        assert {p._dc_meta.master_backend_id for p in made} == {
            backend_ids[tag % len(backend_ids)]
        }


def test_a_driver_that_exits_right_after_its_stores_loses_none(tmp_path):
    script = tmp_path / "exits.py"
    script.write_text(
        "from dataclay_hpc import Client\n"
        "from models import Person\n"
        "client = Client()\n"
        "client.start()\n"
        "Person('first', 0).make_persistent()\n"
        "for i in range(5000):\n"
        "    Person(str(i), i).make_persistent()\n"
    )
    result = run(
        [
            DATACLAY_HPC,
            "run",
            "--backends",
            "1",
            "--storage",
            str(tmp_path / "store"),
            "--log-level",
            "DEBUG",
            "--",
            sys.executable,
            str(script),
        ],
        timeout_s=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stores = re.findall(r"request (make_persistent|store) from", result.stderr)
    assert len(stores) == 5001


def test_the_number_of_stores_ahead_is_checked():
    env = dict(os.environ, DATACLAY_HPC_STORES_AHEAD="2.5")
    result = run([sys.executable, "-c", "import dataclay_hpc"], env=env)
    assert result.returncode != 0
    assert (
        "DATACLAY_HPC_STORES_AHEAD must be a whole number of at least 0; got "
        "'2.5'" in result.stderr
    )


def test_stores_wait_for_their_answers_when_sending_ahead_is_off(tmp_path):
    script = tmp_path / "waits.py"
    script.write_text(
        "from dataclay_hpc import Client, transport\n"
        "from models import Person\n"
        "assert transport.MAX_POSTED == 0\n"
        "with Client() as client:\n"
        "    Person('first', 0).make_persistent()\n"
        "    people = [Person(str(i), i) for i in range(50)]\n"
        "    for person in people:\n"
        "        person.make_persistent()\n"
        "        assert sum(c.posted for c in client.runtime._all_connections) == 0\n"
        "    print('ages', sum(p.age for p in people))\n"
    )
    env = dict(
        os.environ, DATACLAY_HPC_STORAGE=str(tmp_path), DATACLAY_HPC_STORES_AHEAD="0"
    )
    result = run([sys.executable, str(script)], env=env)
    assert result.returncode == 0, result.stderr
    assert f"ages {sum(range(50))}" in result.stdout


def test_an_id_from_getid_is_found_by_another_program(client, backend_ids):
    Person("warm", 0).make_persistent(backend_id=backend_ids[-1])
    people = [Person(f"g{i}", i) for i in range(200)]
    for person in people:
        person.make_persistent(backend_id=backend_ids[-1])
    object_id = json.loads(people[-1].getID())["id"]
    script = (
        "from dataclay_hpc import Client\n"
        "from models import Person\n"
        "with Client():\n"
        f"    print(Person.get_by_id({object_id!r}).age)\n"
    )
    result = run(
        [sys.executable, "-c", script],
        env=dict(os.environ, DATACLAY_HPC_JOB=client.job_dir),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["199"]


def test_stores_of_another_client_of_the_process_are_covered(client, backend_ids):
    handed: queue.Queue = queue.Queue()
    dataset = f"ahead-{uuid.uuid4().hex[:8]}"

    def other_client() -> None:
        with Client(dataset=dataset, backends=len(backend_ids), storage=client.storage):
            for backend_id in backend_ids:
                Person("warm", 0).make_persistent(backend_id=backend_id)
            for i in range(300):
                person = Person(f"o{i}", i)
                person.make_persistent(backend_id=backend_ids[i % len(backend_ids)])
                handed.put(person)
            handed.put(None)
            assert stopping.wait(60)

    stopping = threading.Event()
    worker = threading.Thread(target=other_client)
    worker.start()
    try:
        seen = []
        while (person := handed.get(timeout=60)) is not None:
            # this thread's session is the fixture's client: the same user
            # reads across its datasets, through its own connections
            seen.append(person.age)
        assert seen == list(range(300))
        assert person is None
    finally:
        stopping.set()
        worker.join(timeout=60)


def test_stores_lost_with_their_backend_are_reported_at_the_next_call(tmp_path):
    script = tmp_path / "lost.py"
    script.write_text(
        "import os, signal\n"
        "from dataclay_hpc import Client\n"
        "from dataclay_hpc.exceptions import DataClayException\n"
        "from models import Person\n"
        "client = Client(backends=2)\n"
        "client.start()\n"
        "info = list(client.get_backends().values())[0]\n"
        "Person('first', 0).make_persistent(backend_id=info.id)\n"
        "people = [Person(str(i), i) for i in range(100)]\n"
        "for person in people:\n"
        "    person.make_persistent(backend_id=info.id)\n"
        "os.kill(info.pid, signal.SIGKILL)\n"
        "try:\n"
        "    people[-1].age\n"
        "except DataClayException as exc:\n"
        "    print('raised:', exc)\n"
        "client.stop()\n"
    )
    env = dict(os.environ, DATACLAY_HPC_STORAGE=str(tmp_path / "store"))
    result = run([sys.executable, str(script)], env=env, timeout_s=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raised: objects made persistent on backend rank 1 may not have" in (
        result.stdout
    )
