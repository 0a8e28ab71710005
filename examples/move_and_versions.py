r"""Moving objects between backends, and versions of objects.

The scenarios of docs/move.md and docs/versioning.md, each checked with
``assert``. They need three backends. Run it from the repository root, either
on its own (the client starts an embedded job with 3 backends on this
machine)::

    .venv/bin/python examples/move_and_versions.py

or as the driver of a job with 3 backends or more::

    .venv/bin/dataclay-hpc run --backends 3 -- \
        .venv/bin/python examples/move_and_versions.py

It prints ``move_and_versions: OK`` at the end, and exits with a non-zero code
when a check fails.
"""

import sys

from model import Company, Employee

from dataclay_hpc import Client

NEEDED_BACKENDS = 3


def where(obj, backend_ids):
    """Return the index, in ``backend_ids``, of the backend that holds ``obj``."""
    obj.name  # any access brings _dc_meta.master_backend_id up to date  # noqa: B018
    return backend_ids.index(obj._dc_meta.master_backend_id)


def move_one_object(client):
    """move() without options moves the object alone."""
    backend_ids = list(client.get_backends())

    employee = Employee("John", 1000.0)
    employee.make_persistent()

    employee.move(backend_ids[0])

    assert employee._dc_meta.master_backend_id == backend_ids[0]
    assert employee.name == "John"
    print("move: John is on backend 0")


def move_recursively(client):
    """move(recursive=True) takes every object the company reaches along."""
    backend_ids = list(client.get_backends())

    employee = Employee("John", 1000.0)
    employee.make_persistent(backend_id=backend_ids[0])

    company = Company("ABC", employee)
    company.make_persistent(backend_id=backend_ids[1])

    company.move(backend_ids[2], recursive=True)

    # employee has also moved
    employee.name  # forcing update of the backend_id  # noqa: B018
    assert employee._dc_meta.master_backend_id == backend_ids[2]
    assert company._dc_meta.master_backend_id == backend_ids[2]
    assert company.payroll() == 1000.0
    print("recursive move: ABC and John are on backend 2")


def move_recursively_without_remotes(client):
    """remotes=False leaves the referents other backends hold where they are."""
    backend_ids = list(client.get_backends())

    employee = Employee("John", 1000.0)
    employee.make_persistent(backend_id=backend_ids[0])

    company = Company("ABC", employee)
    company.make_persistent(backend_id=backend_ids[1])

    company.move(backend_ids[2], recursive=True, remotes=False)

    # employee is still in backend 0
    employee.name  # forcing update of the backend_id  # noqa: B018
    assert employee._dc_meta.master_backend_id == backend_ids[0]
    assert where(company, backend_ids) == 2
    assert company.employee is employee
    print("recursive move, remotes=False: ABC is on backend 2, John stays on 0")


def new_version_and_consolidate(client):
    """A version is changed on its own, then consolidated into its original."""
    employee = Employee("John", 1000.0)
    employee.make_persistent()

    # Create a new version of the object
    employee_v1 = employee.new_version()
    assert employee_v1._dc_meta.id != employee._dc_meta.id
    assert employee_v1._dc_meta.original_object_id == employee._dc_meta.id
    assert employee_v1._dc_meta.master_backend_id == employee._dc_meta.master_backend_id

    # Modify the new version
    employee_v1.salary = 2000.0
    assert employee.salary == 1000.0  # the original is untouched so far

    # Consolidate the new version
    employee_v1.consolidate_version()

    # The original object has been updated
    assert employee.salary == 2000.0
    print("versions: the original took the version's salary, 2000.0")


def versions_of_versions(client):
    """A version of a version consolidates into the first original."""
    backend_ids = list(client.get_backends())

    employee = Employee("John", 1000.0)
    employee.make_persistent(backend_id=backend_ids[0])
    original_id = employee._dc_meta.id

    # Create a new version of the object
    employee_v1 = employee.new_version()

    # Create a second version from the first one, on another backend
    employee_v2 = employee_v1.new_version(backend_id=backend_ids[2])
    assert employee_v2._dc_meta.original_object_id == original_id
    assert employee_v2._dc_meta.versions_object_ids == [employee_v1._dc_meta.id]

    # Modify the second version
    employee_v2.salary = 2000.0
    assert (employee.salary, employee_v1.salary) == (1000.0, 1000.0)

    # Consolidate the second version
    employee_v2.consolidate_version()

    # The original object and the first version had been updated
    assert employee.salary == 2000.0
    assert employee_v1.salary == 2000.0
    assert employee_v2.salary == 2000.0

    # the original kept its id and its backend
    employee.sync()
    assert employee._dc_meta.id == original_id
    assert employee._dc_meta.master_backend_id == backend_ids[0]
    print("versions of versions: John, v1 and v2 all read 2000.0")


def main():
    """Run every scenario on a job with at least three backends."""
    client = Client(backends=NEEDED_BACKENDS)
    client.start()
    try:
        found = len(client.get_backends())
        if found < NEEDED_BACKENDS:
            sys.exit(
                f"move_and_versions: needs at least {NEEDED_BACKENDS} backends, the "
                f"job has {found}; run it with dataclay-hpc run --backends "
                f"{NEEDED_BACKENDS} -- python examples/move_and_versions.py"
            )
        move_one_object(client)
        move_recursively(client)
        move_recursively_without_remotes(client)
        new_version_and_consolidate(client)
        versions_of_versions(client)
    finally:
        client.stop()
    print("move_and_versions: OK")


if __name__ == "__main__":
    main()
