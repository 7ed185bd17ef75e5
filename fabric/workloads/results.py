"""The CNI results fabricd answers: an attachment's (from its state record: both interfaces,
its addresses with the gateway 169.254.1.1 or the host end's link-local IPv6, default
routes through them) and the IPAM-only plugin's, rendered in the config's cniVersion."""

from __future__ import annotations

import ipaddress
import json

from cni.result import Interface, IPConfig, IPInterface, Result, Route, render
from cni.spec import IPAMConf, NetConf
from fabric.dataplane.attachment import GATEWAY_V4
from fabric.workloads.checks import gateway_v6
from fabric.workloads.state import Record


def result_of(rec: Record, conf: NetConf) -> Result:
    gw6 = gateway_v6(rec.host_mac)
    ips = tuple(IPConfig(i, GATEWAY_V4 if i.version == 4 else gw6, interface=1) for i in rec.ips)
    routes = tuple(
        Route(ipaddress.ip_network("0.0.0.0/0" if i.version == 4 else "::/0"),
              GATEWAY_V4 if i.version == 4 else gw6)
        for i in rec.ips
    )  # fmt: skip
    interfaces = (
        Interface(rec.host_ifname, rec.host_mac),
        Interface(rec.ifname, rec.pod_mac, rec.netns, mtu=rec.mtu),
    )
    return Result(interfaces, ips, routes, conf.dns)


def ipam_result(addresses: list[IPInterface], ipam: IPAMConf, conf: NetConf) -> Result:
    gateways = {g.version: g for g in ipam.gateway}
    ips = tuple(IPConfig(a, gateways.get(a.version)) for a in addresses)
    return Result((), ips, ipam.routes, conf.dns)


def render_result(result: Result, conf: NetConf) -> bytes:
    return json.dumps(render(result, conf.cni_version)).encode()
