"""The classes the dataClay guide's examples use, as a user would write them."""

from __future__ import annotations

from dataclay_hpc import DataClayObject, activemethod


class Person(DataClayObject):
    name: str
    age: int

    def __init__(self, name: str, age: int) -> None:
        self.name = name
        self.age = age


class Employee(DataClayObject):
    name: str
    salary: float

    def __init__(self, name: str, salary: float) -> None:
        self.name = name
        self.salary = salary

    @activemethod
    def raise_salary(self, amount: float) -> float:
        self.salary += amount
        return self.salary


class Company(DataClayObject):
    name: str
    employee: Employee

    def __init__(self, name: str, employee: Employee) -> None:
        self.name = name
        self.employee = employee
