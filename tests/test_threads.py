"""Sessions across threads: copied contexts, the executor, clients per thread."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from seed_model import Person

from dataclay_hpc import Client, ContextThreadPoolExecutor
from dataclay_hpc.context import current_session


def test_seed_multithreading_example(client, capsys):
    current_context = contextvars.copy_context()

    def job(name, age):
        person = Person(name, age)
        person.make_persistent()

    with ThreadPoolExecutor() as executor:
        for i in range(10):
            future = executor.submit(current_context.run, job, f"Name{i}", i)
            print(future.result())

    assert capsys.readouterr().out.split() == ["None"] * 10


def test_fifty_jobs_at_once_each_with_its_own_copied_context(client):
    made = []
    lock = threading.Lock()

    def job(name, age):
        person = Person(name, age)
        person.make_persistent(alias=name)
        with lock:
            made.append(person)
        return Person.get_by_alias(name).age

    tag = uuid.uuid4().hex[:8]
    with ThreadPoolExecutor(max_workers=50) as executor:
        futures = [
            executor.submit(contextvars.copy_context().run, job, f"{tag}-{i}", i)
            for i in range(50)
        ]
        ages = [f.result(timeout=120) for f in futures]
    assert ages == list(range(50))
    assert all(p._dc_is_registered for p in made)


def test_the_context_executor_carries_the_session_into_its_tasks(client):
    session = current_session()
    with ContextThreadPoolExecutor(max_workers=8) as executor:
        seen = list(executor.map(lambda _: current_session(), range(50)))
    assert all(s is session for s in seen)


def test_asyncio_tasks_and_to_thread_carry_the_session(client):
    session = current_session()

    async def main():
        in_task = await asyncio.create_task(asyncio.sleep(0, current_session()))
        in_thread = await asyncio.to_thread(current_session)
        return in_task, in_thread

    assert asyncio.run(main()) == (session, session)


def test_clients_of_two_threads_keep_their_own_datasets(client):
    backends = len(client.get_backends())
    results = {}
    barrier = threading.Barrier(2)

    def worker(dataset):
        with Client(dataset=dataset, backends=backends, storage=client.storage):
            barrier.wait(timeout=30)
            person = Person(dataset, 1)
            person.make_persistent(alias="same-alias")
            results[dataset] = (
                person._dc_meta.dataset_name,
                Person.get_by_alias("same-alias").name,
                current_session().dataset,
            )

    names = [f"ds-{uuid.uuid4().hex[:6]}", f"ds-{uuid.uuid4().hex[:6]}"]
    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {n: (n, n, n) for n in names}
    assert current_session().dataset == "admin"
