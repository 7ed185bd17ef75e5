"""The IPAM error tree. Callers match on these types, never on message text.

::

    IPAMError
    ├── TransientError            retried inside ipam (bounded); surfaces when retries run out
    │   ├── ConflictError         a compare-and-swap lost against a concurrent writer
    │   └── DatastoreUnavailable  no etcd endpoint answered (CNI: code 11, CLI: exit 2)
    ├── ValidationError           bad input; names the field (CLI: exit 1, CNI: code 7)
    ├── NotFoundError             the named object does not exist
    ├── InUseError                refused because addresses are still allocated
    ├── AlreadyAllocatedError     a requested address is taken by another handle
    ├── ExhaustedError            no pool can hand out an address on this node
    └── StaleError                a release whose sequence number no longer matches (raised
                                  by fabricctl; the package returns such addresses as stale)
"""

from __future__ import annotations


class IPAMError(Exception):
    """Root of every error raised by the ipam package."""


class TransientError(IPAMError):
    """A condition that may clear by itself; retried inside the package."""


class ConflictError(TransientError):
    """A compare-and-swap transaction lost against a concurrent writer."""


class DatastoreUnavailable(TransientError):
    """No configured etcd endpoint answered."""


class ValidationError(IPAMError):
    """Bad input. ``field`` names what was wrong, ``problem`` says why."""

    def __init__(self, field: str, problem: str, resource: str = "") -> None:
        self.field = field
        self.problem = problem
        self.resource = resource
        where = f"{resource}: " if resource else ""
        super().__init__(f"{where}field {field!r}: {problem}")


class NotFoundError(IPAMError):
    """The named object does not exist."""


class InUseError(IPAMError):
    """Refused because the object still has allocated addresses."""


class AlreadyAllocatedError(IPAMError):
    """A specifically requested address is allocated to another handle."""


class ExhaustedError(IPAMError):
    """No enabled pool matching this node has a free address (or a block could be claimed)."""


class StaleError(IPAMError):
    """A release named a sequence number that no longer matches: the address was reused."""
