"""Datasets enforced by the backends, and execution constraints in the context."""

from __future__ import annotations

import contextvars
import gc
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from models import Person, Solver

from dataclay_hpc import (
    Client,
    ContextThreadPoolExecutor,
    DataClayObject,
    constraints,
    current_constraints,
    use_dataset,
)
from dataclay_hpc.context import current_session
from dataclay_hpc.exceptions import (
    AliasDoesNotExistError,
    DatasetAccessError,
    ObjectDoesNotExistError,
)
from dataclay_hpc.object import heap_lookup


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def two_datasets(client):
    """An object with an alias in dataset A, and a session of dataset B (same user)."""
    dataset_a, dataset_b, alias = _name("a"), _name("b"), _name("alias")
    with use_dataset(dataset_a):
        person = Person("in-a", 30)
        person.make_persistent(alias=alias)
    return person, dataset_a, dataset_b, alias


def _in_thread(function, *args, timeout_s: float = 120):
    """Run ``function`` in a fresh thread (no copied context); return or raise."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{function} did not finish in {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# -- one user, several datasets ------------------------------------------------


def test_objects_land_in_the_dataset_of_use_dataset(two_datasets):
    person, dataset_a, _, _ = two_datasets
    assert person._dc_meta.dataset_name == dataset_a
    assert current_session().dataset == "admin"


def test_an_alias_is_visible_only_in_its_dataset_unless_named(two_datasets):
    person, dataset_a, dataset_b, alias = two_datasets
    with use_dataset(dataset_b):
        with pytest.raises(AliasDoesNotExistError, match=dataset_b):
            Person.get_by_alias(alias)
        assert Person.get_by_alias(alias, dataset_name=dataset_a) is person
    with pytest.raises(AliasDoesNotExistError):
        Person.get_by_alias(alias)


def test_the_same_user_reads_across_its_datasets_but_writes_only_in_the_objects(
    two_datasets,
):
    person, dataset_a, dataset_b, _ = two_datasets
    with use_dataset(dataset_b):
        assert person.name == "in-a"
        with pytest.raises(DatasetAccessError) as denied:
            person.age = 99
        message = str(denied.value)
        assert dataset_a in message and dataset_b in message
        assert "use_dataset" in message
        assert denied.value.write is True
        with pytest.raises(DatasetAccessError):
            person.birthday()
        with pytest.raises(DatasetAccessError):
            del person.nickname
        with pytest.raises(DatasetAccessError):
            person.new_version()
        friend = Person("volatile", 1)
        with pytest.raises(DatasetAccessError):
            person.nickname = friend
        assert not friend._dc_is_registered
        with pytest.raises(ObjectDoesNotExistError):
            Person.get_by_id(friend._dc_meta.id)
    assert person.age == 30, "a denied write changed the object"
    with use_dataset(dataset_a):
        person.age = 31
        assert person.birthday() == 32


def test_moving_an_object_of_another_dataset_is_denied(two_datasets, backend_ids):
    person, dataset_a, dataset_b, _ = two_datasets
    where = person._dc_meta.master_backend_id
    other = next(b for b in backend_ids if b != where)
    with use_dataset(dataset_b):
        with pytest.raises(DatasetAccessError, match=dataset_a):
            person.move(other)
    person.sync()
    assert person._dc_meta.master_backend_id == where


def test_a_versions_lifecycle_needs_its_dataset(two_datasets):
    person, dataset_a, dataset_b, _ = two_datasets
    with use_dataset(dataset_a):
        version = person.new_version()
        version.age = 40
    with use_dataset(dataset_b):
        with pytest.raises(DatasetAccessError):
            version.consolidate_version()
        with pytest.raises(DatasetAccessError):
            version.discard_version()
    with use_dataset(dataset_a):
        version.consolidate_version()
    assert person.age == 40


def test_aliases_in_a_named_dataset_of_the_same_user(two_datasets):
    person, dataset_a, dataset_b, alias = two_datasets
    with use_dataset(dataset_b):
        assert person.get_aliases() == {alias}
        DataClayObject.delete_alias(alias, dataset_name=dataset_a)
        with pytest.raises(AliasDoesNotExistError):
            Person.get_by_alias(alias, dataset_name=dataset_a)


def test_get_by_id_reaches_the_users_other_datasets(two_datasets):
    person, _, dataset_b, _ = two_datasets
    with use_dataset(dataset_b):
        assert Person.get_by_id(person._dc_meta.id) is person


def test_code_inside_the_job_follows_references_across_datasets(client, backend_ids):
    dataset_a, dataset_b = _name("a"), _name("b")
    with use_dataset(dataset_b):
        item = Solver("item")
        item.make_persistent(backend_id=backend_ids[-1])
    with use_dataset(dataset_a):
        holder = Solver("holder", item)
        holder.make_persistent(backend_id=backend_ids[0])
        with pytest.raises(DatasetAccessError):
            item.label = "direct"
        # the holder's method reaches what the holder refers to
        assert holder.relabel_partner("through-holder") == "through-holder"
    assert item.label == "through-holder"


def test_use_dataset_nests_and_follows_copied_contexts(client):
    outer, inner = _name("outer"), _name("inner")
    with use_dataset(outer):
        with use_dataset(inner):
            context = contextvars.copy_context()
            with ContextThreadPoolExecutor(max_workers=4) as executor:
                seen = list(executor.map(lambda _: current_session().dataset, range(8)))
        assert seen == [inner] * 8
        assert context.run(lambda: current_session().dataset) == inner
        assert current_session().dataset == outer
    assert current_session().dataset == "admin"


@pytest.mark.parametrize("bad", ["", None, 3])
def test_use_dataset_rejects_a_bad_name(client, bad):
    with pytest.raises(ValueError, match="non-empty string"):
        with use_dataset(bad):
            pass


def test_fifty_jobs_each_in_its_own_dataset(client):
    tag = _name("job")

    def job(i):
        with use_dataset(f"{tag}-{i}"):
            mine = Person.get_by_alias("same-alias")
            neighbour = Person.get_by_alias(
                "same-alias", dataset_name=f"{tag}-{(i + 1) % 50}"
            )
            try:
                neighbour.age = -1
            except DatasetAccessError:
                denied = True
            else:
                denied = False
            return mine._dc_meta.dataset_name, neighbour.name, denied

    with ThreadPoolExecutor(max_workers=50) as executor:
        # every job must have made its object before any looks at its neighbour's
        warm = [
            executor.submit(contextvars.copy_context().run, _make, tag, i)
            for i in range(50)
        ]
        [f.result(timeout=120) for f in warm]
        futures = [
            executor.submit(contextvars.copy_context().run, job, i) for i in range(50)
        ]
        results = [f.result(timeout=120) for f in futures]
    assert results == [(f"{tag}-{i}", f"p{(i + 1) % 50}", True) for i in range(50)]


def _make(tag: str, i: int) -> None:
    with use_dataset(f"{tag}-{i}"):
        Person(f"p{i}", i).make_persistent(alias="same-alias")


# -- other users ---------------------------------------------------------------


def test_a_dataset_belongs_to_the_user_who_opened_it_first(client):
    dataset = _name("alice-data")
    backends = len(client.get_backends())

    def alice_then_bob():
        with Client(
            dataset=dataset, username="alice", backends=backends, storage=client.storage
        ):
            pass
        bob = Client(
            dataset=dataset, username="bob", backends=backends, storage=client.storage
        )
        with pytest.raises(DatasetAccessError) as denied:
            bob.start()
        assert not bob.is_active
        return str(denied.value)

    message = _in_thread(alice_then_bob)
    assert "'bob'" in message and "'alice'" in message and dataset in message


def test_the_admin_dataset_is_admins(client):
    backends = len(client.get_backends())

    def bob_in_admin():
        with pytest.raises(DatasetAccessError, match="admin"):
            Client(
                dataset="admin",
                username="bob",
                backends=backends,
                storage=client.storage,
            ).start()
        with Client(username="bob", backends=backends, storage=client.storage) as bob:
            return bob.dataset

    assert _in_thread(bob_in_admin) == "bob"


def _client_as(username, dataset, client):
    """Return a client of ``username`` in ``dataset`` on the job of ``client``."""
    return Client(
        dataset=dataset,
        username=username,
        backends=len(client.get_backends()),
        storage=client.storage,
    )


def test_another_users_session_reaches_nothing_of_alices(client):
    alice_data, bob_data, alias = _name("alice"), _name("bob"), _name("alias")
    made = {}

    def alice():
        with _client_as("alice", alice_data, client):
            person = Person("alice", 1)
            person.make_persistent(alias=alias)
            made["person"] = person
            other = Person("alice", 2)
            other.make_persistent()
            made["other_id"] = other._dc_meta.id  # only its id stays here

    _in_thread(alice)
    person = made["person"]
    gc.collect()
    assert heap_lookup(made["other_id"]) is None

    def bob():
        errors = []
        with _client_as("bob", bob_data, client):
            for attempt in (
                lambda: Person.get_by_alias(alias, dataset_name=alice_data),
                lambda: Person.get_by_id(made["other_id"]),
                lambda: person.name,
                lambda: setattr(person, "age", 2),
                lambda: DataClayObject.delete_alias(alias, dataset_name=alice_data),
            ):
                try:
                    attempt()
                except DatasetAccessError as exc:
                    errors.append(exc)
            with pytest.raises(DatasetAccessError):
                with use_dataset(alice_data):
                    pass
        return errors

    errors = _in_thread(bob)
    assert len(errors) == 5
    for error in errors:
        assert error.owner == "alice" and error.username == "bob"
        assert alice_data in str(error) and bob_data in str(error)

    def alice_again():
        with _client_as("alice", alice_data, client):
            return Person.get_by_alias(alias).age

    assert _in_thread(alice_again) == 1


# -- execution constraints -----------------------------------------------------


@pytest.fixture
def solvers(client, backend_ids):
    near = Solver("near")
    near.make_persistent(backend_id=backend_ids[-1])
    far = Solver("far", near)
    far.make_persistent(backend_id=backend_ids[0])
    return far, near


def test_max_threads_limits_the_native_pools_of_the_method(solvers):
    far, _ = solvers
    unlimited, none = far.native_threads()
    assert none is None
    if unlimited is None or unlimited < 2:
        pytest.skip(f"the backend's BLAS runs {unlimited} thread(s): nothing to limit")
    with constraints(max_threads=1) as limits:
        assert current_constraints() is limits
        assert far.native_threads() == (1, 1)
    assert far.native_threads() == (unlimited, None), "the limit outlived the call"


def test_max_threads_follows_nested_calls_to_other_backends(solvers):
    far, _ = solvers
    with constraints(max_threads=1):
        assert far.partner_native_threads() == (1, 1)
    assert far.partner_native_threads()[1] is None


def test_constraints_follow_copied_contexts_into_threads(solvers):
    far, _ = solvers
    with constraints(max_threads=1):
        with ContextThreadPoolExecutor(max_workers=8) as executor:
            seen = list(executor.map(lambda _: far.native_threads(), range(16)))
    assert seen == [(1, 1)] * 16


def test_concurrent_limits_take_the_smallest_and_restore_after(solvers):
    far, _ = solvers
    unlimited, _ = far.native_threads()

    def constrained(limit):
        with constraints(max_threads=limit):
            return far.hold_native_threads(0.3)

    with ThreadPoolExecutor(max_workers=4) as executor:
        results = list(executor.map(constrained, [1, 1, 2, 1]))
    # a method limited to 1 always runs with at most 1 thread
    assert [r for r in results if r[1] == 1] == [(1, 1)] * 3
    assert far.native_threads() == (unlimited, None)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_constraints_reject_a_bad_max_threads(bad):
    with pytest.raises(ValueError, match="positive integer"):
        with constraints(max_threads=bad):
            pass
