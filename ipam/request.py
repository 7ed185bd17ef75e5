"""What a caller asks the allocator for, and its validation (before any datastore access)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ipam.errors import ValidationError


@dataclass(frozen=True, slots=True)
class AssignRequest:
    """Ask for ``num_v4`` IPv4 and ``num_v6`` IPv6 addresses for ``handle`` on ``node``.

    ``pools_v4``/``pools_v6`` restrict the pools (names or CIDRs; empty = every pool whose
    nodeSelector matches the node). All or nothing: either every address is assigned in one
    transaction, or none is.
    """

    handle: str
    node: str
    num_v4: int = 1
    num_v6: int = 0
    attrs: Mapping[str, str] = field(default_factory=dict)
    pools_v4: tuple[str, ...] = ()
    pools_v6: tuple[str, ...] = ()
    node_labels: Mapping[str, str] | None = None


def validate_request(req: AssignRequest) -> None:
    check_handle(req.handle)
    if req.num_v4 < 0 or req.num_v6 < 0 or req.num_v4 + req.num_v6 == 0:
        raise ValidationError("num", "ask for at least one address")


def check_handle(handle: str) -> None:
    if (
        not handle
        or "/" in handle
        or len(handle) > 253
        or not handle.isprintable()
        or " " in handle
    ):
        raise ValidationError(
            "handle", f"{handle!r} must be 1-253 printable characters without '/' or spaces"
        )
