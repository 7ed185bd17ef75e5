"""BGPPeer and BGPConfiguration documents for ``fabricctl apply|get|delete`` (hooked into
fabric.resources.documents, which owns the document envelope).

Specs use Calico's field names. Beyond what the bgp model stores, documents may carry:

- durations as Calico writes them (``90s``, ``1m30s``, ``2m``) or as plain seconds, for
  ``holdTime``, ``keepaliveTime``, ``maxRestartTime``, ``nodeMeshHoldTime`` and
  ``nodeMeshMaxRestartTime``; they are stored and printed as whole seconds;
- ``password: {file: PATH}`` (and ``nodeMeshPassword: {file: PATH}``): fabricd reads the key
  from that file on each node; ``password: {credential: NAME}``: from the systemd credential
  NAME (``LoadCredential=NAME:/path`` in fabricd's unit; read from
  ``$CREDENTIALS_DIRECTORY/NAME``). Calico's ``secretKeyRef`` is refused (no Kubernetes
  here); the flat ``passwordFile`` / ``passwordCredential`` (``nodeMeshPasswordFile`` /
  ``nodeMeshPasswordCredential``) are accepted too.

Only the BGPConfiguration named ``default`` exists (no per-node overrides).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from bgp.config import BGPConfig, Peer
from bgp.errors import ValidationError
from fabric.resources.bgp_store import BGPStore, check_selector
from ipam import keys
from ipam.errors import NotFoundError

BGPPEER, BGPCONFIG = "BGPPeer", "BGPConfiguration"
KINDS = (BGPPEER, BGPCONFIG)
BGP_CONFIG_NAME = "default"
ALIASES = {
    BGPPEER: ("bgppeer", "bgppeers", "peer", "peers"),
    BGPCONFIG: ("bgpconfiguration", "bgpconfigurations", "bgpconfig", "bgpconfigs"),
}

_PEER_DURATIONS = ("holdTime", "keepaliveTime", "maxRestartTime")
_MESH_DURATIONS = ("nodeMeshHoldTime", "nodeMeshMaxRestartTime")
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)"
_UNIT = {"ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "µs": Fraction(1, 10**6),
         "ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}  # fmt: skip


def parse_duration(v: Any, fld: str, res: str = "") -> int | None:
    """Whole seconds from an integer or a Go duration string (``90``, ``90s``, ``1m30s``);
    None stays None. Range checks are the bgp model's."""
    if v is None or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    text = v.strip() if isinstance(v, str) else None
    if text is not None and re.fullmatch(r"-?\d+", text):
        return int(text)
    if text is None or not re.fullmatch(f"(?:{_DURATION_PART})+", text):
        raise ValidationError(fld, f"{v!r} is not a duration (seconds, or like 90s, 1m30s)", res)
    total = sum((Fraction(n) * _UNIT[u] for n, u in re.findall(_DURATION_PART, text)), Fraction())
    if total.denominator != 1:
        raise ValidationError(fld, f"{v!r} is not a whole number of seconds", res)
    return int(total)


def _password_file(d: dict[str, Any], ref: str, flat: str, res: str) -> None:
    """Turn ``ref: {file: PATH}`` / ``ref: {credential: NAME}`` into the model's
    ``flat: PATH`` / ``<flat minus File>Credential: NAME`` in place."""
    if ref not in d:
        return
    pw = d.pop(ref)
    cred = flat.removesuffix("File") + "Credential"
    for taken in (flat, cred):
        if taken in d:
            raise ValidationError(ref, f"set at most one of {ref} and {taken}", res)
    if isinstance(pw, Mapping) and "secretKeyRef" in pw:
        raise ValidationError(f"{ref}.secretKeyRef", "not supported: fabricd reads the "
                              f"password from a file on each node ({ref}: {{file: PATH}} or "
                              "{credential: NAME}, a systemd credential)", res)  # fmt: skip
    if not isinstance(pw, Mapping) or len(pw) != 1 or set(pw) - {"file", "credential"}:
        raise ValidationError(ref, "must be {file: PATH} or {credential: NAME}", res)
    if "file" in pw:
        d[flat] = pw["file"]
    else:
        d[cred] = pw["credential"]


def _in_spec(e: ValidationError, res: str) -> ValidationError:
    fld = e.field if e.field.startswith("metadata.") else f"spec.{e.field}"
    return ValidationError(fld, e.problem, res)


# conversions -------------------------------------------------------------------------------


def peer_from_spec(name: str, spec: Mapping[str, Any]) -> Peer:
    """A validated Peer from a Calico-shaped spec; errors name ``spec.<field>``."""
    res = f"BGPPeer {name}"
    try:
        d = _normalised(spec, "password", "passwordFile", _PEER_DURATIONS, res)
        return Peer.from_json(name, d, check_selector)
    except ValidationError as e:
        raise _in_spec(e, res) from e


def _normalised(
    spec: Mapping[str, Any], pw_key: str, pw_file_key: str, durations: tuple[str, ...], res: str
) -> dict[str, Any]:
    """The stored form of a spec: ``{pw_key: {file: F}}`` as ``pw_file_key: F``, Calico
    durations ("90s", "1m30s") as seconds."""
    d = dict(spec)
    _password_file(d, pw_key, pw_file_key, res)
    for f in durations:
        if f in d:
            d[f] = parse_duration(d[f], f, res)
    return d


def _with_password_ref(d: dict[str, Any], pw_file_key: str, pw_key: str) -> dict[str, Any]:
    """The inverse for display: ``pw_file_key: F`` back to ``{pw_key: {file: F}}``, the
    credential name to ``{pw_key: {credential: N}}``."""
    pw = d.pop(pw_file_key, None)
    cred = d.pop(pw_file_key.removesuffix("File") + "Credential", None)
    if pw is not None:
        d[pw_key] = {"file": pw}
    elif cred is not None:
        d[pw_key] = {"credential": cred}
    return d


def peer_spec(peer: Peer) -> dict[str, Any]:
    return _with_password_ref(peer.to_json(), "passwordFile", "password")


def config_from_spec(name: str, spec: Mapping[str, Any]) -> BGPConfig:
    res = f"{BGPCONFIG} {name}"
    if name != BGP_CONFIG_NAME:
        raise ValidationError("metadata.name", f"must be {BGP_CONFIG_NAME!r} (per-node "
                              "BGPConfiguration overrides are not supported)", res)  # fmt: skip
    try:
        d = _normalised(spec, "nodeMeshPassword", "nodeMeshPasswordFile", _MESH_DURATIONS, res)
        return BGPConfig.from_json(d, res)
    except ValidationError as e:
        raise _in_spec(e, res) from e


def config_spec(cfg: BGPConfig) -> dict[str, Any]:
    return _with_password_ref(cfg.to_json(), "nodeMeshPasswordFile", "nodeMeshPassword")


# apply / get / delete ----------------------------------------------------------------------


async def apply(bs: BGPStore, kind: str, name: str, spec: Mapping[str, Any]) -> str:
    """Create or replace one resource: ``created``, ``configured`` or ``unchanged``."""
    if kind == BGPPEER:
        new = peer_from_spec(name, spec)
        try:
            old: Peer | None = await bs.get_peer(name)
        except NotFoundError:
            old = None
        if old == new:
            return "unchanged"
        await bs.put_peer(new)
        return "created" if old is None else "configured"
    cfg = config_from_spec(name, spec)
    changed = False

    def change(old: BGPConfig) -> BGPConfig:
        nonlocal changed
        changed = old != cfg
        return cfg

    await bs.update_config(change)
    return "configured" if changed else "unchanged"


async def get(bs: BGPStore, kind: str, name: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(name, spec) of every resource of ``kind``, or of the one named (NotFoundError)."""
    if kind == BGPPEER:
        if name is not None:
            return [(name, peer_spec(await bs.get_peer(name)))]
        return [(p.name, peer_spec(p)) for p in await bs.list_peers()]
    if name not in (None, BGP_CONFIG_NAME):
        raise NotFoundError(f"{BGPCONFIG} {name} not found (the only one is 'default')")
    _, cfg = await bs.get_config()
    return [(BGP_CONFIG_NAME, config_spec(cfg))]


async def delete(bs: BGPStore, kind: str, name: str) -> str:
    if kind == BGPPEER:
        await bs.delete_peer(name)
        return f"BGPPeer {name} deleted"
    if name != BGP_CONFIG_NAME:
        raise NotFoundError(f"{BGPCONFIG} {name} not found (the only one is 'default')")
    await bs.store.delete(keys.CONFIG_BGP)
    return f"{BGPCONFIG} default deleted (defaults apply)"


# tables ------------------------------------------------------------------------------------


def seconds(v: object) -> str:
    return "" if v is None else f"{v}s"


def peer_scope(spec: Mapping[str, Any]) -> str:
    """Which local nodes have the session: one node, a selector, or all (global)."""
    return str(spec.get("node") or spec.get("nodeSelector") or "(global)")


def table_rows(kind: str, docs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    if kind == BGPPEER:
        headers = ["NAME", "PEERIP", "ASN", "NODE/SELECTOR", "PEERSELECTOR", "HOLD"]
        rows = [[d["metadata"]["name"], s.get("peerIP"), s.get("asNumber"), peer_scope(s),
                 s.get("peerSelector"), seconds(s.get("holdTime"))]
                for d in docs for s in [d["spec"]]]  # fmt: skip
        return headers, rows
    headers = ["NAME", "MESHENABLED", "ASNUMBER", "LISTENPORT"]
    rows = [[d["metadata"]["name"], s["nodeToNodeMeshEnabled"], s["asNumber"], s["listenPort"]]
            for d in docs for s in [d["spec"]]]  # fmt: skip
    return headers, rows
