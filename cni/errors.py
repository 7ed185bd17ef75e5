"""CNI error codes and the one error type, rendered as the spec's error JSON.

Codes 0-99 are the spec's; 100 and up are this plugin's own (docs/design/cni.md has the table).
Every error a verb can return is a ``CNIError``; anything else that escapes a verb is a bug
and is reported as ``INTERNAL`` (999, as libcni's ``ErrInternal``).
"""

from __future__ import annotations

import json
from enum import IntEnum

LATEST = "1.1.0"


class Code(IntEnum):
    # the spec's well-known codes
    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50
    LIMITED_CONNECTIVITY = 51
    # this plugin's codes (100 and up)
    ADDRESS_TAKEN = 100  # a requested address (IP=) is held by another attachment
    POOL_EXHAUSTED = 101  # no pool can hand out an address on this node
    INTERFACE_EXISTS = 102  # the pod or host interface name is taken by something else
    DATAPLANE_FAILURE = 103  # the kernel refused to create or configure the interfaces
    HOST_ROUTE_FAILURE = 104  # the host route <pod>/32 dev <veth> could not be installed
    CHECK_FAILED = 105  # CHECK: interface, address or route differs from prevResult
    IPAM_MISMATCH = 106  # CHECK: the IPAM record does not hold exactly prevResult's addresses
    INTERNAL = 999  # a bug in fabric (the message says what; fabricd's log has the trace)


class CNIError(Exception):
    """A CNI error: ``code``, a one-line ``msg`` and optional ``details``.

    ``msg`` names the field or variable that was wrong (the spec asks for it on codes 2
    and 4).
    """

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def to_json(self, version: str = LATEST) -> bytes:
        """The spec's error document (UTF-8 JSON)."""
        doc = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return json.dumps(doc).encode()

    def __repr__(self) -> str:
        return f"CNIError({self.code}, {self.msg!r})"
