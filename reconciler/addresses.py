"""Where the HTTP order source may connect: a policy over host names and network addresses.

A config names its source by URL, but what a loop really talks to is whatever that name
resolves to when a connection is made, and the answer may change between two requests (DNS
rebinding). So the policy is checked at two points: the URL's host name against the allowed
hosts before a request is made, and every address just before a socket connects to it
(`reconciler.source` hands `address_refusal` to aiohttp as its socket factory's check). A name
that resolves to a refused address meets the same check as the address written in the URL.

The defaults refuse link-local networks, where cloud metadata services answer with the
machine's credentials, and allow everything else, loopback and private networks included,
because order sources often live next to the product. Operators close more networks with
`RECONCILER_SOURCE_REFUSED_NETWORKS` or name the only allowed ones with
`RECONCILER_SOURCE_ALLOWED_NETWORKS`; a refused network wins over an allowed one.

This module is pure: no sockets, no settings object, so it is unit-tested with plain values.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_REFUSED_NETWORKS = "169.254.0.0/16,fe80::/10,fd00:ec2::254/128"

# What a refused network is, for the error text; only the defaults need a name.
_KNOWN_NETWORKS = {
    ipaddress.ip_network("169.254.0.0/16"): "IPv4 link-local, where cloud metadata services answer",
    ipaddress.ip_network("fe80::/10"): "IPv6 link-local",
    ipaddress.ip_network("fd00:ec2::254/128"): "the AWS metadata service over IPv6",
}
# IPv6 prefixes whose last 32 bits are an IPv4 address that a connection may reach.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHOWN_NETWORKS = 4


class AddressRefused(OSError):
    """A connection the policy does not allow. An `OSError`, so that a refused address is
    skipped like an unreachable one and the next address of the same name is tried."""


def parse_networks(text: str, *, setting: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDR networks (or single addresses); raises ValueError naming the
    setting and the entry. Host bits must be zero: `10.1.2.3/8` is more likely a typo than
    a wish for `10.0.0.0/8`."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as error:
            raise ValueError(f"{setting}: {entry!r} is not a network like 10.0.0.0/8 or "
                             f"fd00::/8 ({error})") from None
    return tuple(networks)


def parse_hosts(text: str, *, setting: str) -> tuple[str, ...]:
    """Comma-separated host names; `.example.com` stands for every name below example.com."""
    hosts = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name = _normal_host(entry)
        bare = name.removeprefix(".")
        if not bare or any(c.isspace() or c in "/:@*?#" for c in bare):
            raise ValueError(f"{setting}: {entry!r} is not a host name like orders.example.com "
                             f"or .example.com")
        hosts.append(name)
    return tuple(hosts)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    # Empty: every host name is allowed.
    allowed_hosts: tuple[str, ...] = ()
    # Empty: every address outside the refused networks is allowed.
    allowed_networks: tuple[IPNetwork, ...] = ()
    refused_networks: tuple[IPNetwork, ...] = field(
        default_factory=lambda: parse_networks(DEFAULT_REFUSED_NETWORKS, setting="default")
    )

    def host_refusal(self, host: str) -> str | None:
        """Why a URL's host name is refused, or None when it is allowed."""
        if not self.allowed_hosts:
            return None
        # Limitation: names are compared as written, so an internationalised name allowed
        # in its xn-- form does not match a URL that writes it in Unicode, nor the reverse.
        name = _normal_host(host)
        for allowed in self.allowed_hosts:
            if name == allowed or (allowed.startswith(".") and name.endswith(allowed)):
                return None
        return (f"source host {name} is not in RECONCILER_SOURCE_ALLOWED_HOSTS; point "
                f"source.url at an allowed host or add this one to that setting")

    def address_refusal(self, address: str) -> str | None:
        """Why connecting to `address` (as a socket address gives it, an IPv6 one perhaps
        with a `%zone`) is refused, or None when it is allowed. Says what to change."""
        try:
            candidates = _reachable_forms(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return f"{address!r} is not an IP address"
        for candidate in candidates:
            for network in self.refused_networks:
                if candidate in network:
                    return (f"it is in {_describe(network)}, which "
                            f"RECONCILER_SOURCE_REFUSED_NETWORKS refuses; point source.url "
                            f"at another host or take the network out of that setting")
        if self.allowed_networks and not any(
            candidate in network for candidate in candidates for network in self.allowed_networks
        ):
            shown = ", ".join(str(n) for n in self.allowed_networks[:_SHOWN_NETWORKS])
            more = len(self.allowed_networks) - _SHOWN_NETWORKS
            if more > 0:
                shown += f" and {more} more"
            return (f"it is in none of RECONCILER_SOURCE_ALLOWED_NETWORKS ({shown}); point "
                    f"source.url at an allowed host or add its network to that setting")
        return None


def _reachable_forms(address: IPAddress) -> list[IPAddress]:
    """The address and every other address a connection to it reaches: the IPv4 address
    inside an IPv4-mapped or NAT64 IPv6 address, loopback for the unspecified address."""
    forms: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        elif address in _NAT64:
            forms.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for form in list(forms):
        if form.is_unspecified:
            forms.append(ipaddress.ip_address("127.0.0.1" if form.version == 4 else "::1"))
    return forms


def _describe(network: IPNetwork) -> str:
    known = _KNOWN_NETWORKS.get(network)
    return f"{network} ({known})" if known else str(network)


def _normal_host(host: str) -> str:
    return host.strip().lower().rstrip(".")
