"""A first tour of dataclay_hpc: persistent objects, aliases and active methods.

Run it from the repository root, either on its own (the client starts an
embedded job with 2 backends on this machine)::

    .venv/bin/python examples/quickstart.py

or as the driver of a job with 3 backends::

    .venv/bin/dataclay-hpc run --backends 3 -- .venv/bin/python examples/quickstart.py

The objects are written to ./dataclay-hpc-store (one HDF5 file per backend).
"""

from model import Company, Employee, Person

from dataclay_hpc import Client

client = Client()
client.start()
try:
    # the job's backends, in rank order
    backends = client.get_backends()
    backend_ids = list(backends)
    first, last = backend_ids[0], backend_ids[-1]
    print(f"job with {len(backends)} backends:")
    for backend_id, info in backends.items():
        host, port = info.address
        print(f"  {backend_id}: rank {info.rank} on {info.host}, {host}:{port}")

    # make objects persistent
    person = Person("Alice", 30)
    print(f"before make_persistent: registered={person._dc_is_registered}")
    person.make_persistent()  # no alias, a backend chosen at random
    print(f"Alice is on backend {person._dc_meta.master_backend_id}")
    assert person._dc_is_registered and not person._dc_is_local

    employee = Employee("Bob", 1000.0)
    employee.make_persistent(alias="bob", backend_id=first)
    assert employee._dc_meta.master_backend_id == first

    # the company is stored on the last backend; Bob is already persistent and
    # stays where he is: the company refers to him
    company = Company("ACME", employee)
    company.make_persistent(alias="acme", backend_id=last)
    assert company._dc_meta.master_backend_id == last
    assert company.employee is employee
    print(f"Bob is on backend {first}, ACME on backend {last}")

    # attributes through proxies
    person.age = 31  # a write sent to Alice's backend
    print(f"{person.name} is {person.age}")
    assert person.age == 31

    # active methods run on the backend that holds the object
    age = person.birthday()
    print(f"after birthday(): {person.name} is {age}")
    assert age == 32 and person.age == 32

    # ACME's backend runs raise_all(), which calls Bob's raise_salary() on his backend
    salary = company.raise_all(10)
    print(f"after raise_all(10): Bob earns {salary}")
    assert salary == 1100.0 and employee.salary == 1100.0
    assert company.where() == str(last)

    # an object created inside an active method is persistent on that backend
    carol = company.hire("Carol", 1200.0)
    print(f"hire() made {carol.name} on backend {carol._dc_meta.master_backend_id}")
    assert carol._dc_is_registered
    assert carol._dc_meta.master_backend_id == last
    assert company.employee is carol
    assert company.payroll() == 1200.0

    # aliases: one Python object per object id in this process
    assert Employee.get_by_alias("bob") is employee
    assert Company.get_by_alias("acme") is company
    print(f"aliases of ACME: {sorted(company.get_aliases())}")

    # flush to the store, then read again
    written = client.flush_all()
    print(f"flush_all() wrote {written} objects to the store")
    assert written >= 4
    # each access below reloads the object from its backend's HDF5 file
    assert person.age == 32
    assert employee.salary == 1100.0
    assert company.employee.name == "Carol"
    assert company.payroll() == 1200.0
    print(f"after reload: {person.name} is {person.age}, ACME pays {company.payroll()}")

    # aliases are unique in a dataset: remove them so the next run can reuse them
    Employee.delete_alias("bob")
    Company.delete_alias("acme")
finally:
    client.stop()

print("quickstart: OK")
