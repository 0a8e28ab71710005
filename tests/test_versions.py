"""new_version / consolidate_version / discard_version, alone and under concurrency."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading

import pytest
from models import Company, Node, Person
from seed_model import Employee

from dataclay_hpc.exceptions import (
    ObjectDoesNotExistError,
    ObjectIsNotVersionError,
    ObjectNotRegisteredError,
    VersionConflictError,
)


def test_seed_new_version_and_consolidate(client):
    employee = Employee("John", 1000.0)
    employee.make_persistent()

    # Create a new version of the object
    employee_v1 = employee.new_version()

    # Modify the new version
    employee_v1.salary = 2000.0

    # Consolidate the new version
    employee_v1.consolidate_version()

    # The original object has been updated
    assert employee.salary == 2000.0


def test_seed_versions_of_versions(client):
    employee = Employee("John", 1000.0)
    employee.make_persistent()

    # Create a new version of the object
    employee_v1 = employee.new_version()

    # Create a second version from the first one
    employee_v2 = employee_v1.new_version()

    # Modify the second version
    employee_v2.salary = 2000.0

    # Consolidate the second version
    employee_v2.consolidate_version()

    # The original object and the first version had been updated
    assert employee.salary == 2000.0
    assert employee_v1.salary == 2000.0


def test_a_version_is_an_independent_copy_with_its_lineage(client, backend_ids):
    person = Person("Ada", 36)
    person.make_persistent(backend_id=backend_ids[0])
    v1 = person.new_version()
    v2 = v1.new_version(backend_id=backend_ids[-1])
    assert len({person._dc_meta.id, v1._dc_meta.id, v2._dc_meta.id}) == 3
    assert v1._dc_meta.original_object_id == person._dc_meta.id
    assert v1._dc_meta.versions_object_ids == []
    assert v2._dc_meta.original_object_id == person._dc_meta.id
    assert v2._dc_meta.versions_object_ids == [v1._dc_meta.id]
    assert v1._dc_meta.master_backend_id == backend_ids[0]
    assert v2._dc_meta.master_backend_id == backend_ids[-1]
    v2.age = 99
    v2.birthday()
    assert (person.age, v1.age, v2.age) == (36, 36, 100)


def test_consolidation_keeps_the_originals_id_and_backend(client, backend_ids):
    person = Person("Bea", 1)
    person.make_persistent(backend_id=backend_ids[0])
    original_id = person._dc_meta.id
    version = person.new_version(backend_id=backend_ids[-1])
    version.age = 5
    version.consolidate_version()
    person.sync()
    assert person._dc_meta.id == original_id
    assert person._dc_meta.master_backend_id == backend_ids[0]
    assert person.age == 5
    assert version.age == 5  # a consolidated version reads the original
    person.age = 6
    assert version.age == 6


def test_references_to_a_consolidated_version_resolve_to_the_original(
    client, backend_ids
):
    person = Person("Cid", 10)
    person.make_persistent(backend_id=backend_ids[0])
    v1 = person.new_version()
    v2 = v1.new_version(backend_id=backend_ids[-1])
    holder = Node(0)
    holder.value = v1  # a reference to an intermediate version
    holder.make_persistent(backend_id=backend_ids[-1])
    v2.age = 42
    v2.consolidate_version()
    assert holder.value_age() == 42  # followed inside a backend
    assert holder.value.age == 42
    person.age = 43
    assert holder.value_age() == 43


def test_versions_share_referenced_objects(client):
    company = Company("Shared")
    company.make_persistent()
    hired = company.hire("Dot", 30)
    version = company.new_version()
    version.birthdays()  # changes the shared person, not a copy
    assert hired.age == 31
    assert company.ages() == [31]


def test_consolidating_twice_or_a_non_version_is_refused(client):
    person = Person("Eli", 1)
    person.make_persistent()
    with pytest.raises(ObjectIsNotVersionError, match="is not a version"):
        person.consolidate_version()
    version = person.new_version()
    version.consolidate_version()
    with pytest.raises(ObjectIsNotVersionError):
        version.consolidate_version()
    with pytest.raises(ObjectIsNotVersionError):
        version.discard_version()
    with pytest.raises(ObjectNotRegisteredError):
        Person("vol", 1).new_version()


def test_a_discarded_version_is_freed_and_leaves_the_original_alone(client):
    person = Person("Fay", 7)
    person.make_persistent()
    version = person.new_version()
    version.age = 70
    version.discard_version()
    assert person.age == 7
    with pytest.raises(ObjectDoesNotExistError, match="discarded"):
        version.age  # noqa: B018
    with pytest.raises(ObjectIsNotVersionError):
        version.consolidate_version()


def test_unchecked_consolidation_is_last_writer_wins(client):
    person = Person("Gus", 0)
    person.make_persistent()
    first, second = person.new_version(), person.new_version()
    first.age, second.age = 1, 2
    first.consolidate_version()
    second.consolidate_version()
    assert person.age == 2


def test_checked_consolidation_refuses_a_changed_original(client):
    person = Person("Hal", 0)
    person.make_persistent()
    version = person.new_version()
    version.age = 10
    person.age = 5  # the original changes after the version was made
    with pytest.raises(
        VersionConflictError, match="changed since the version was made"
    ):
        version.consolidate_version(check=True)
    assert person.age == 5
    fresh = person.new_version()
    fresh.age = 11
    fresh.consolidate_version(check=True)
    assert person.age == 11


def test_exactly_one_of_many_concurrent_checked_consolidations_wins(
    client, backend_ids
):
    person = Person("Ivy", 0)
    person.make_persistent(backend_id=backend_ids[0])
    for round_ in range(5):
        versions = [
            person.new_version(backend_id=backend_ids[i % len(backend_ids)])
            for i in range(8)
        ]
        for index, version in enumerate(versions):
            version.age = 1000 * (round_ + 1) + index
        barrier = threading.Barrier(len(versions))

        def consolidate(version, barrier=barrier):
            barrier.wait(timeout=30)
            try:
                version.consolidate_version(check=True)
                return "won"
            except VersionConflictError:
                return "lost"

        with concurrent.futures.ThreadPoolExecutor(len(versions)) as pool:
            outcomes = list(pool.map(consolidate, versions, timeout=120))
        assert outcomes.count("won") == 1, outcomes
        winner = versions[outcomes.index("won")]
        assert person.age == 1000 * (round_ + 1) + versions.index(winner)


CONTENDER = """
import sys
from dataclay_hpc import Client
from dataclay_hpc.exceptions import VersionConflictError
from models import Person
with Client():
    person = Person.get_by_alias(sys.argv[1])
    version = person.new_version()
    version.age = int(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        version.consolidate_version(check=True)
        print("won", flush=True)
    except VersionConflictError:
        version.discard_version()
        print("lost", flush=True)
"""


def test_exactly_one_process_wins_a_checked_consolidation(client, tmp_path):
    person = Person("Joe", 0)
    alias = f"joe-{os.getpid()}"
    person.make_persistent(alias=alias)
    script = tmp_path / "contender.py"
    script.write_text(CONTENDER)
    env = dict(os.environ, DATACLAY_HPC_JOB=client.job_dir)
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), alias, str(100 + i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(4)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = [p.communicate(timeout=120)[0].strip() for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert sorted(outcomes) == ["lost", "lost", "lost", "won"]
    assert person.age == 100 + outcomes.index("won")


def test_awaitable_version_twins(client):
    import asyncio

    async def main():
        person = Person("Kai", 1)
        await person.a_make_persistent()
        version = await person.a_new_version()
        version.age = 2
        await version.a_consolidate_version(check=True)
        other = await person.a_new_version()
        await other.a_discard_version()
        return person.age

    assert asyncio.run(main()) == 2


def test_a_version_on_the_same_backend_does_not_share_arrays(client):
    import numpy as np
    from models import Matrix

    matrix = Matrix(np.zeros(10))
    matrix.make_persistent()
    version = matrix.new_version()
    version.data = version.data + 1
    assert matrix.sum() == 0.0
    assert version.sum() == 10.0


def test_a_recursive_move_passes_consolidated_and_discarded_versions(
    client, backend_ids
):
    person = Person("Lea", 1)
    person.make_persistent(backend_id=backend_ids[0])
    kept = person.new_version(backend_id=backend_ids[-1])
    kept.age = 2
    kept.consolidate_version()
    dropped = person.new_version(backend_id=backend_ids[-1])
    dropped.discard_version()
    company = Company("Versions")
    company.make_persistent(backend_id=backend_ids[-1])
    company.people = [kept, dropped]
    company.move(backend_ids[0], recursive=True)
    company.name  # noqa: B018
    assert company._dc_meta.master_backend_id == backend_ids[0]
    assert kept.age == person.age == 2
    kept.sync()
    assert kept._dc_meta.original_object_id == person._dc_meta.id


def test_a_taken_alias_leaves_a_persistent_object_in_place(client, backend_ids):
    from dataclay_hpc.exceptions import AliasAlreadyExistError

    first, second = Person("Mo", 1), Person("Ned", 2)
    alias = f"mo-{os.getpid()}"
    first.make_persistent(alias=alias)
    second.make_persistent(backend_id=backend_ids[0])
    with pytest.raises(AliasAlreadyExistError):
        second.make_persistent(alias=alias, backend_id=backend_ids[-1])
    second.sync()
    assert second._dc_meta.master_backend_id == backend_ids[0]
