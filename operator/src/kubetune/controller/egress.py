"""Which addresses the operator may call for a FineTuneJob.

A FineTuneJob names an S3 endpoint (spec.storage.endpoint), and the operator calls it with the
namespace's credentials to read config.json and the trainer's progress. Without a rule, any user
who may create a FineTuneJob could make the operator send signed requests to the cloud metadata
service, the apiserver's loopback or a node's kubelet. The rule: addresses that are loopback,
link-local (169.254.0.0/16 holds every cloud's metadata service), unspecified, multicast or
reserved are refused unless the cluster admin allows them with ``--allow-endpoint``; so are the
metadata service's host names. Every resolved address of a name must pass, so a name that resolves
to one allowed and one refused address is refused. A name that resolves differently later (DNS
rebinding) is not covered: that is NetworkPolicy's job for the operator pod (docs/operator.md).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Names of metadata services that resolve only inside a cloud; refused before any lookup.
METADATA_NAMES = (
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
)


class EndpointRefused(ValueError):
    """The operator will not call this endpoint; the message names the field and the way out."""


def _refused_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, test in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
    ):
        if test:
            return kind
    if isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.ip_network("fd00:ec2::/32"):
        return "link-local"  # AWS's IPv6 metadata address
    return None


def _parse_allow(entry: str) -> tuple[ipaddress._BaseNetwork | None, str | None, int | None]:
    """An --allow-endpoint entry: a CIDR or address, or a host name, optionally with :port."""
    e = entry.strip()
    try:
        return ipaddress.ip_network(e, strict=False), None, None
    except ValueError:
        pass
    host, _, port = e.rpartition(":") if e.count(":") == 1 else (e, "", "")
    try:
        return ipaddress.ip_network(host, strict=False), None, int(port) if port else None
    except ValueError:
        return None, host.lower(), int(port) if port else None


@dataclass
class EgressPolicy:
    """``allow``: --allow-endpoint entries (CIDRs, addresses or host names, each with an optional
    :port) that are called even though their addresses would be refused."""

    allow: tuple[str, ...] = ()
    resolve: object = socket.getaddrinfo
    cache_seconds: float = 60.0
    _cache: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._allow = [_parse_allow(a) for a in self.allow if a.strip()]

    def _allowed(self, host: str, port: int, ip: ipaddress._BaseAddress | None) -> bool:
        for net, name, p in self._allow:
            if p is not None and p != port:
                continue
            if name is not None and name == host:
                return True
            if net is not None and ip is not None and ip in net:
                return True
        return False

    def _addresses(self, host: str, port: int) -> tuple[str, ...]:
        key = (host, port)
        with self._lock:
            hit = self._cache.get(key)
            if hit and time.monotonic() - hit[0] < self.cache_seconds:
                return hit[1]
        infos = self.resolve(host, port, proto=socket.IPPROTO_TCP)  # type: ignore[operator]
        addrs = tuple(sorted({i[4][0] for i in infos}))
        with self._lock:
            if len(self._cache) > 1024:
                self._cache.clear()  # bounded: a hostile burst of names cannot grow it
            self._cache[key] = (time.monotonic(), addrs)
        return addrs

    def check(self, url: str, field_name: str) -> None:
        """Raise EndpointRefused when the operator must not call ``url`` (from ``field_name``)."""
        u = urlsplit(url)
        host = (u.hostname or "").lower().rstrip(".")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise EndpointRefused(f"{field_name}: the port of {_show(url)} is not a number from 1 to 65535") from None
        if u.scheme not in ("http", "https") or not host:
            raise EndpointRefused(f"{field_name}: {_show(url)} is not an http(s) URL with a host")
        if u.username is not None or u.password is not None:
            raise EndpointRefused(
                f"{field_name}: credentials in the URL are not allowed: put them in spec.storage.credentialsSecret"
            )
        way_out = (
            f"use an endpoint the operator may call, or ask the cluster admin to allow it "
            f"(kubetune operator --allow-endpoint {host}, Helm value operator.allowEndpoints)"
        )
        if self._allowed(host, port, None):
            return
        if host in METADATA_NAMES or host.endswith(".metadata.google.internal"):
            raise EndpointRefused(
                f"{field_name}: {host} is a cloud metadata service, which the operator never calls: {way_out}"
            )
        try:
            literal = ipaddress.ip_address(host)
            addrs: tuple[str, ...] = (str(literal),)
        except ValueError:
            try:
                addrs = self._addresses(host, port)
            except (OSError, UnicodeError) as e:
                raise EndpointRefused(
                    f"{field_name}: the host {host} does not resolve "
                    f"({getattr(e, 'strerror', None) or type(e).__name__}): check the URL"
                ) from None
        for a in addrs:
            ip = ipaddress.ip_address(a.split("%", 1)[0])
            kind = _refused_kind(ip)
            if kind and not self._allowed(host, port, ip):
                where = host if host == a else f"{host} ({a})"
                raise EndpointRefused(
                    f"{field_name}: {where} is a {kind} address, which the operator does not call: {way_out}"
                )


def _show(url: str) -> str:
    """The URL for a message, never with its userinfo."""
    u = urlsplit(url)
    if "@" in u.netloc:
        u = u._replace(netloc="***@" + u.netloc.rsplit("@", 1)[1])
    return repr(u.geturl()[:200])
