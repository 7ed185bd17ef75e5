"""What a CNI verb's failure becomes for the runtime (docs/design/cni.md, "Error codes"):
the one mapping from the errors of ipam, the dataplane and netlink to CNI error codes.
Order matters: the first matching type wins (subclasses before their parents).
"""

from __future__ import annotations

from cni import errors as cni_errors
from fabric.dataplane import attachment as dataplane
from fabric.dataplane.netlink import NetlinkError
from fabric.errors import describe
from ipam import errors as ipam_errors

_CNI_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ipam_errors.DatastoreUnavailable, cni_errors.Code.TRY_AGAIN_LATER),
    # retries ran out against concurrent writers: the same request may well succeed soon
    (ipam_errors.ConflictError, cni_errors.Code.TRY_AGAIN_LATER),
    (ipam_errors.ValidationError, cni_errors.Code.INVALID_CONFIG),
    (ipam_errors.NotFoundError, cni_errors.Code.INVALID_CONFIG),
    (ipam_errors.AlreadyAllocatedError, cni_errors.Code.ADDRESS_TAKEN),
    (ipam_errors.ExhaustedError, cni_errors.Code.POOL_EXHAUSTED),
    (ipam_errors.IPAMError, cni_errors.Code.TRY_AGAIN_LATER),  # etcd refused a request
    (dataplane.InvalidAttachment, cni_errors.Code.INVALID_CONFIG),  # mtu, sysctls
    (dataplane.NetnsNotFound, cni_errors.Code.UNKNOWN_CONTAINER),
    (dataplane.InterfaceExists, cni_errors.Code.INTERFACE_EXISTS),
    (dataplane.DataplaneError, cni_errors.Code.DATAPLANE_FAILURE),
    (NetlinkError, cni_errors.Code.HOST_ROUTE_FAILURE),
    (TimeoutError, cni_errors.Code.TRY_AGAIN_LATER),
    (OSError, cni_errors.Code.IO_FAILURE),  # the state dir
)


def cni_error(exc: BaseException) -> cni_errors.CNIError:
    """The CNI error for ``exc``: a CNIError as is, a known error with its code, anything
    else INTERNAL (a bug) naming the exception type."""
    if isinstance(exc, cni_errors.CNIError):
        return exc
    for typ, code in _CNI_CODES:
        if isinstance(exc, typ):
            if isinstance(exc, ipam_errors.ValidationError):
                return cni_errors.CNIError(code, describe(exc.resource, exc.field, exc.problem))
            return cni_errors.CNIError(code, " ".join(str(exc).split()) or type(exc).__name__)
    return cni_errors.CNIError(
        cni_errors.Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    )
