"""Where the webhook action may connect: the SSRF guard (issue 4).

A webhook URL is written by a workflow author, so it must not reach what only
the engine's network can reach: private and CGNAT ranges, loopback, link-local
(169.254.169.254 is the cloud metadata service), unique-local IPv6, multicast,
unspecified and reserved addresses, and the IPv6 forms that embed those IPv4
addresses (IPv4-mapped, 6to4, NAT64). An allow-list of networks admits some of
them (the daemon's `webhook_allow`, a tenant's own list).

The guard checks addresses, not names, and it checks them twice, both at
connect time: the resolver refuses a name if any address it resolves to is
refused (so DNS rebinding between a check and the connect has nothing to
rebind), and the socket factory refuses every address the connector is about
to connect to, IP literals included (so no path around the resolver exists).
"""

from __future__ import annotations

import ipaddress
import socket
import typing

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_METADATA = ipaddress.IPv4Address("169.254.169.254")

#: Named ranges, most specific reason first; anything else not globally routable is refused too.
_REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("100.64.0.0/10", "shared CGNAT space (RFC 6598)"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("fc00::/7", "unique-local (private IPv6)"),
        ("ff00::/8", "multicast"),
    )
)


class EgressRefused(OSError):
    """A connection the guard refused. An OSError, so that aiohttp's connector treats it as a failed connect."""

    def __init__(self, address: str, reason: str, host: str | None = None):
        via = f" (resolved from {host!r})" if host and host != address else ""
        super().__init__(f"refused by the egress policy: {address}{via} is {reason}")
        self.address = address
        self.reason = reason
        self.host = host


class EgressPolicy:
    """Which IP addresses a webhook may connect to."""

    __slots__ = ("allow",)

    def __init__(self, allow: typing.Iterable[IPNetwork | str] = ()):
        self.allow: tuple[IPNetwork, ...] = tuple(
            net
            if isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            else ipaddress.ip_network(net, strict=False)
            for net in allow
        )

    def refusal(self, address: IPAddress | str) -> str | None:
        """Why `address` is refused, or None when it may be connected to."""
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
        if self._allowed(ip):
            return None
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            if self._allowed(embedded):
                return None
            # The IPv4 address decides: ::ffff:8.8.8.8 is as public as 8.8.8.8.
            inner = self._reason(embedded)
            return None if inner is None else f"an IPv6 form of {embedded}, which is {inner}"
        return self._reason(ip)

    def check(self, address: str, host: str | None = None) -> None:
        reason = self.refusal(address)
        if reason is not None:
            raise EgressRefused(address, reason, host)

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allow)

    @staticmethod
    def _reason(ip: IPAddress) -> str | None:
        for net, why in _REFUSED:
            if ip.version == net.version and ip in net:
                if ip == _METADATA:
                    return "link-local (the cloud metadata service)"
                return why
        if ip.is_multicast:
            return "multicast"
        if not ip.is_global:
            return "not globally routable (reserved or special-purpose)"
        return None

    # -- aiohttp hooks ----------------------------------------------------------

    def socket_factory(self, addr_info) -> socket.socket:
        """aiohttp's TCPConnector(socket_factory=...): called for every address it connects to."""
        family, type_, proto, _, sockaddr = addr_info
        self.check(sockaddr[0])
        return socket.socket(family=family, type=type_, proto=proto)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class GuardedResolver(AbstractResolver):
    """Resolves with the default resolver, then refuses the name if any address is refused.

    Refusing the whole name (rather than dropping the bad addresses) keeps a
    hostile DNS answer that mixes a public and a private address from ever
    reaching the private one, and the error says which address it was.
    """

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None):
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._policy.check(result["host"], host)
        return results

    async def close(self) -> None:
        await self._inner.close()
