"""The one place that maps errors to fabricctl exit codes and one-line messages. (What a
CNI verb's failure becomes for the runtime is :mod:`fabric.workloads.errors`.)

Exit codes::

    0  success
    1  user error: bad input, unknown or conflicting resource, refused operation
       (ipam ValidationError, NotFoundError, InUseError, AlreadyAllocatedError, ExhaustedError,
       StaleError; bgp ValidationError; a bad file or document; a bad command line)
    2  the datastore is unreachable (ipam DatastoreUnavailable)
    3  ``ipam check`` found problems (not an error: the report says what they are)
    4  ``explain`` found the path blocked (not an error: the report says where and why)
    70 internal error (a bug: set FABRIC_DEBUG=1 for the traceback)

Messages are one line on stderr that name the resource and, for bad input, the field.
Errors are matched by type, never by their text.
"""

from __future__ import annotations

from bgp import errors as bgp_errors
from ipam import errors as ipam_errors

EXIT_OK = 0
EXIT_USER = 1
EXIT_UNAVAILABLE = 2
EXIT_PROBLEMS = 3
EXIT_BLOCKED = 4
EXIT_INTERNAL = 70


class CLIError(Exception):
    """Bad input found by the CLI itself (a file, a document, an option); exit 1.

    ``resource`` says what was being handled (``IPPool p1``, ``report.json``), ``field`` the
    part of it that was wrong.
    """

    def __init__(self, problem: str, resource: str = "", field: str = "") -> None:
        self.problem = problem
        self.resource = resource
        self.field = field
        super().__init__(describe(resource, field, problem))


# Order matters: the first matching type wins (subclasses before their parents).
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ipam_errors.DatastoreUnavailable, EXIT_UNAVAILABLE),
    (ipam_errors.ValidationError, EXIT_USER),
    (bgp_errors.ValidationError, EXIT_USER),
    (ipam_errors.NotFoundError, EXIT_USER),
    (ipam_errors.InUseError, EXIT_USER),
    (ipam_errors.AlreadyAllocatedError, EXIT_USER),
    (ipam_errors.ExhaustedError, EXIT_USER),
    (ipam_errors.StaleError, EXIT_USER),
    # Retries ran out against concurrent writers, or etcd refused a request: the operator
    # can run the command again; nothing about the datastore's reachability is known.
    (ipam_errors.IPAMError, EXIT_USER),
    (CLIError, EXIT_USER),
)


def exit_code(exc: BaseException) -> int:
    """The exit code for ``exc``; EXIT_INTERNAL for anything that is not a known error."""
    for typ, code in _EXIT_CODES:
        if isinstance(exc, typ):
            return code
    return EXIT_INTERNAL


def is_known(exc: BaseException) -> bool:
    return exit_code(exc) != EXIT_INTERNAL


def message(exc: BaseException, resource: str = "") -> str:
    """One line naming the resource (``resource`` fills in when the error names none)."""
    if isinstance(exc, ipam_errors.ValidationError | bgp_errors.ValidationError | CLIError):
        text = describe(exc.resource or resource, exc.field, exc.problem)
    elif is_known(exc):
        text = str(exc) or type(exc).__name__
    else:
        text = f"internal error: {type(exc).__name__}: {exc} (set FABRIC_DEBUG=1 for a traceback)"
    return "error: " + " ".join(text.split())


def describe(resource: str, field: str, problem: str) -> str:
    """``resource: field 'x': problem``, leaving out what is empty."""
    parts = [resource] if resource else []
    if field:
        parts.append(f"field {field!r}")
    parts.append(problem)
    return ": ".join(parts)
