"""IP pools, IPAM configuration and reservations: models and validation, no I/O.

Field names follow Calico's IPPool, IPAMConfig and IPReservation resources so that operators
can carry their YAML over.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ipam import selector
from ipam.block import IPAddr, IPNetwork
from ipam.errors import ValidationError

# Defaults as Calico's: a /26 holds 64 pods, about what one node runs; /122 likewise for v6.
DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
# Smallest and largest block sizes accepted: a /20 block (4096 addresses) is the most one
# CAS-updated JSON value should carry; /32 (/128) blocks are single addresses.
BLOCK_SIZE_RANGE = {4: (20, 32), 6: (116, 128)}

# Ranges a pool must never overlap: they are never routable pod addresses.
FORBIDDEN = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "fe80::/10",
        "ff00::/8",
    )
)

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


def validate_name(name: str, resource: str = "IPPool") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValidationError(
            "metadata.name",
            f"{name!r} must be lower-case letters, digits, '-' or '.', 1-63 characters",
            resource,
        )
    return name


def parse_cidr(value: object, field_name: str, resource: str = "") -> IPNetwork:
    """A CIDR in canonical form; host bits set or garbage is a ValidationError naming the field."""
    if not isinstance(value, str) or "/" not in value:
        raise ValidationError(
            field_name, f"{value!r} is not a CIDR (want e.g. 10.244.0.0/16)", resource
        )
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValidationError(
                field_name, f"{value!r} is not a valid CIDR: {e}", resource
            ) from e
        raise ValidationError(
            field_name, f"{value!r} has host bits set (did you mean {loose}?)", resource
        ) from e


def parse_ip(value: object, field_name: str) -> IPAddr:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError as e:
        raise ValidationError(field_name, f"{value!r} is not an IP address") from e


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    cidr: IPNetwork
    block_size: int
    disabled: bool = False
    node_selector: str = "all()"
    nat_outgoing: bool = False
    disable_bgp_export: bool = False

    @property
    def version(self) -> int:
        return self.cidr.version

    def selects(self, labels: Mapping[str, str]) -> bool:
        return selector.parse(self.node_selector, "spec.nodeSelector").matches(labels)

    @property
    def block_count(self) -> int:
        return 1 << (self.block_size - self.cidr.prefixlen)

    def block_at(self, index: int) -> IPNetwork:
        """The ``index``-th block of this pool, in address order."""
        step = 1 << (self.cidr.max_prefixlen - self.block_size)
        base = int(self.cidr.network_address) + index * step
        return ipaddress.ip_network((base, self.block_size))

    def blocks(self) -> Iterator[IPNetwork]:
        return self.cidr.subnets(new_prefix=self.block_size)

    def spec(self) -> dict[str, Any]:
        return {
            "cidr": str(self.cidr),
            "blockSize": self.block_size,
            "disabled": self.disabled,
            "nodeSelector": self.node_selector,
            "natOutgoing": self.nat_outgoing,
            "disableBGPExport": self.disable_bgp_export,
        }

    @classmethod
    def from_spec(cls, name: str, spec: Mapping[str, Any]) -> Pool:
        """Build and validate a pool; every problem is a ValidationError naming the field."""
        res = f"IPPool {name}"
        validate_name(name)
        if not isinstance(spec, Mapping):
            raise ValidationError("spec", "must be a mapping", res)
        known = {"cidr", "blockSize", "disabled", "nodeSelector", "natOutgoing", "disableBGPExport"}
        for k in spec:
            if k not in known:
                raise ValidationError(f"spec.{k}", f"unknown field (known: {sorted(known)})", res)
        if "cidr" not in spec:
            raise ValidationError("spec.cidr", "is required", res)
        cidr = parse_cidr(spec["cidr"], "spec.cidr", res)
        for bad in FORBIDDEN:
            if bad.version == cidr.version and cidr.overlaps(bad):
                raise ValidationError(
                    "spec.cidr", f"{cidr} overlaps reserved range {bad} (loopback, link-local, "
                    "multicast or unspecified addresses are never pod addresses)", res)  # fmt: skip
        bs = spec.get("blockSize", DEFAULT_BLOCK_SIZE[cidr.version])
        if not isinstance(bs, int) or isinstance(bs, bool):
            raise ValidationError("spec.blockSize", f"{bs!r} is not an integer", res)
        lo, hi = BLOCK_SIZE_RANGE[cidr.version]
        if not lo <= bs <= hi:
            raise ValidationError(
                "spec.blockSize", f"/{bs} is outside {lo}..{hi} for IPv{cidr.version}", res
            )
        if bs < cidr.prefixlen:
            raise ValidationError(
                "spec.blockSize", f"block /{bs} is larger than the pool {cidr}", res
            )
        sel = spec.get("nodeSelector") or "all()"
        selector.parse(str(sel), "spec.nodeSelector")
        bools = {}
        for key in ("disabled", "natOutgoing", "disableBGPExport"):
            v = spec.get(key, False)
            if not isinstance(v, bool):
                raise ValidationError(f"spec.{key}", f"{v!r} is not true or false", res)
            bools[key] = v
        return cls(
            name=name,
            cidr=cidr,
            block_size=bs,
            disabled=bools["disabled"],
            node_selector=str(sel),
            nat_outgoing=bools["natOutgoing"],
            disable_bgp_export=bools["disableBGPExport"],
        )

    def updated(self, spec: Mapping[str, Any]) -> Pool:
        """This pool with ``spec`` applied; cidr and blockSize are immutable once created."""
        new = Pool.from_spec(self.name, {"blockSize": self.block_size, **spec})
        if new.cidr != self.cidr:
            raise ValidationError(
                "spec.cidr", "is immutable; create a new pool", f"IPPool {self.name}"
            )
        if new.block_size != self.block_size:
            raise ValidationError(
                "spec.blockSize", "is immutable once the pool exists", f"IPPool {self.name}"
            )
        return new

    def with_disabled(self, disabled: bool) -> Pool:
        return replace(self, disabled=disabled)


def check_overlap(pool: Pool, others: list[Pool]) -> None:
    for o in others:
        if (
            o.name != pool.name
            and o.cidr.version == pool.cidr.version
            and o.cidr.overlaps(pool.cidr)
        ):
            raise ValidationError(
                "spec.cidr", f"{pool.cidr} overlaps pool {o.name} ({o.cidr})", f"IPPool {pool.name}"
            )


@dataclass(frozen=True, slots=True)
class IPAMConfig:
    """Cluster-wide IPAM settings (Calico's IPAMConfig).

    ``max_blocks_per_host`` 0 means no limit. With ``strict_affinity`` a node never borrows an
    address from another node's block.
    """

    strict_affinity: bool = False
    max_blocks_per_host: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "strictAffinity": self.strict_affinity,
            "maxBlocksPerHost": self.max_blocks_per_host,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> IPAMConfig:
        sa = d.get("strictAffinity", False)
        mb = d.get("maxBlocksPerHost", 0)
        if not isinstance(sa, bool):
            raise ValidationError("strictAffinity", f"{sa!r} is not true or false", "IPAMConfig")
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 0:
            raise ValidationError(
                "maxBlocksPerHost", f"{mb!r} is not an integer >= 0", "IPAMConfig"
            )
        return cls(strict_affinity=sa, max_blocks_per_host=mb)


@dataclass(frozen=True, slots=True)
class Reservation:
    """Addresses IPAM never hands out (Calico's IPReservation)."""

    name: str
    cidrs: tuple[IPNetwork, ...] = field(default_factory=tuple)

    def spec(self) -> dict[str, Any]:
        return {"reservedCIDRs": [str(c) for c in self.cidrs]}

    @classmethod
    def from_spec(cls, name: str, spec: Mapping[str, Any]) -> Reservation:
        validate_name(name, "IPReservation")
        raw = spec.get("reservedCIDRs")
        if not isinstance(raw, list) or not raw:
            raise ValidationError(
                "spec.reservedCIDRs", "must be a non-empty list of CIDRs", f"IPReservation {name}"
            )
        cidrs = []
        for i, c in enumerate(raw):
            s = str(c) if "/" in str(c) else f"{c}/{32 if ':' not in str(c) else 128}"
            cidrs.append(parse_cidr(s, f"spec.reservedCIDRs[{i}]", f"IPReservation {name}"))
        return cls(name=name, cidrs=tuple(cidrs))
