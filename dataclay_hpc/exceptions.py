"""Errors raised by dataclay_hpc.

Every message states the constraint that was broken, the value that broke it
and what to do about it. Errors raised on a backend reach the caller as the same
class, with the backend's traceback chained as the cause.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AliasAlreadyExistError",
    "AliasDoesNotExistError",
    "AlreadyExistError",
    "BackendDoesNotExistError",
    "BackendUnavailableError",
    "ClassImportError",
    "DataClayException",
    "DatasetAccessError",
    "DoesNotExistError",
    "JobError",
    "ObjectDoesNotExistError",
    "ObjectIsNotVersionError",
    "ObjectNotRegisteredError",
    "RemoteTraceback",
    "VersionConflictError",
]


class DataClayException(Exception):
    """Base class of every error dataclay_hpc raises on purpose."""


class AlreadyExistError(DataClayException):
    """Something that must be unique exists already."""


class AliasAlreadyExistError(AlreadyExistError):
    """An alias is already taken in its dataset."""

    def __init__(self, alias: str, dataset_name: str) -> None:
        self.alias = alias
        self.dataset_name = dataset_name
        super().__init__(
            f"{dataset_name}/{alias} already exists: aliases are unique per "
            f"dataset; pick another alias or delete_alias({alias!r}) first"
        )

    def __reduce__(self):
        return (type(self), (self.alias, self.dataset_name))


class ClassImportError(DataClayException):
    """A process of the job cannot import the class of an object it received."""


class DoesNotExistError(DataClayException):
    """Something that was looked up does not exist."""


class AliasDoesNotExistError(DoesNotExistError):
    """No object carries the alias in the dataset."""

    def __init__(self, alias: str, dataset_name: str) -> None:
        self.alias = alias
        self.dataset_name = dataset_name
        super().__init__(
            f"alias {alias!r} does not exist in dataset {dataset_name!r}; "
            "make_persistent(alias=...) or add_alias() creates it"
        )

    def __reduce__(self):
        return (type(self), (self.alias, self.dataset_name))


class ObjectDoesNotExistError(DoesNotExistError):
    """No backend of the job holds an object with that id."""

    def __init__(self, object_id: object, detail: str = "") -> None:
        self.object_id = object_id
        self.detail = detail
        text = f"object {object_id} does not exist in this job"
        super().__init__(f"{text}: {detail}" if detail else text)

    def __reduce__(self):
        return (type(self), (self.object_id, self.detail))


class BackendDoesNotExistError(DoesNotExistError):
    """A backend id that is not part of the job."""

    def __init__(self, backend_id: object, known: Iterable[object] = ()) -> None:
        self.backend_id = backend_id
        self.known = tuple(known)
        names = ", ".join(str(b) for b in self.known) or "none"
        super().__init__(
            f"backend {backend_id} does not exist in this job; valid backend ids "
            f"(client.get_backends()) are: {names}"
        )

    def __reduce__(self):
        return (type(self), (self.backend_id, self.known))


class ObjectNotRegisteredError(DataClayException):
    """An operation that needs a persistent object got a volatile one."""

    def __init__(self, what: object) -> None:
        self.what = what
        super().__init__(
            f"object {what} is not registered! call make_persistent() first"
        )

    def __reduce__(self):
        return (type(self), (self.what,))


class ObjectIsNotVersionError(DataClayException):
    """consolidate_version() was called on an object that is not a version."""

    def __init__(self, object_id: object) -> None:
        self.object_id = object_id
        super().__init__(
            f"object {object_id} is not a version! only objects returned by "
            "new_version() can be consolidated, once"
        )

    def __reduce__(self):
        return (type(self), (self.object_id,))


class VersionConflictError(DataClayException):
    """A checked consolidation found the original changed since the version."""


class BackendUnavailableError(DataClayException):
    """A backend of the job cannot be reached."""


class DatasetAccessError(DataClayException):
    """A session reached for a dataset its user may not use that way.

    Attributes:
        what: The object, alias or dataset that was asked for.
        dataset_name: The dataset it belongs to.
        session_dataset: The dataset of the session that asked.
        username: The user of that session.
        owner: The user the dataset belongs to.
        write: Whether the request would have changed it.
    """

    def __init__(
        self,
        what: str | None,
        dataset_name: str,
        session_dataset: str,
        username: str,
        owner: str | None,
        write: bool,
    ) -> None:
        self.what = what
        self.dataset_name = dataset_name
        self.session_dataset = session_dataset
        self.username = username
        self.owner = owner
        self.write = write
        if what is None:
            text = (
                f"user {username!r} cannot open a session on dataset "
                f"{dataset_name!r}: it belongs to user {owner!r}, and only its "
                "owner's sessions reach it; use a dataset of your own "
                "(Client(dataset=..., username=...))"
            )
        elif owner is not None and owner != username:
            text = (
                f"{what} belongs to dataset {dataset_name!r} of user {owner!r}; "
                f"the session {username}/{session_dataset} cannot reach it: only "
                "the owner's sessions reach a dataset"
            )
        else:
            text = (
                f"{what} belongs to dataset {dataset_name!r}; the session "
                f"{username}/{session_dataset} may read it but not change it: "
                "changes need a session of the object's dataset, e.g. "
                f"`with dataclay_hpc.use_dataset({dataset_name!r}): ...`"
            )
        super().__init__(text)

    def __reduce__(self):
        return (
            type(self),
            (
                self.what,
                self.dataset_name,
                self.session_dataset,
                self.username,
                self.owner,
                self.write,
            ),
        )


class JobError(DataClayException):
    """The job could not start, or was asked for something it cannot do."""


class RemoteTraceback(Exception):
    """The traceback of an error raised on a backend, chained as a cause."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""
