"""Where loops may connect: the address policy, and the socket factory that applies it to
every address a connection is about to be made to."""

from __future__ import annotations

import socket

import pytest

from reconciler.addresses import (
    AddressPolicy,
    AddressRefused,
    parse_hosts,
    parse_networks,
)
from reconciler.settings import Settings
from reconciler.source import _connect_attempts, _policed_socket_factory

DEFAULT = AddressPolicy()


@pytest.mark.parametrize("address", [
    "169.254.169.254",           # the cloud metadata service (AWS, GCP, Azure, …)
    "169.254.0.1",
    "fe80::1",
    "fe80::1%eth0",              # a socket address with its zone
    "fd00:ec2::254",             # AWS metadata over IPv6
    "::ffff:169.254.169.254",    # IPv4-mapped: the socket reaches the IPv4 address
    "64:ff9b::a9fe:a9fe",        # NAT64 of 169.254.169.254
])
def test_link_local_and_metadata_addresses_are_refused_by_default(address):
    reason = DEFAULT.address_refusal(address)

    assert reason is not None
    assert "RECONCILER_SOURCE_REFUSED_NETWORKS" in reason


@pytest.mark.parametrize("address", [
    "127.0.0.1", "::1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "fd12::1", "93.184.215.14",
    "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
])
def test_loopback_private_and_public_addresses_stay_allowed_by_default(address):
    assert DEFAULT.address_refusal(address) is None


def test_the_metadata_refusal_names_the_network_and_what_it_is():
    reason = DEFAULT.address_refusal("169.254.169.254")

    assert reason.startswith("it is in 169.254.0.0/16 (IPv4 link-local, where cloud metadata "
                             "services answer), which RECONCILER_SOURCE_REFUSED_NETWORKS refuses")
    assert "point source.url at another host" in reason


def test_refused_networks_close_loopback_and_private_networks():
    policy = AddressPolicy(refused_networks=parse_networks(
        "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7",
        setting="RECONCILER_SOURCE_REFUSED_NETWORKS"))

    refused = [a for a in ("127.0.0.1", "::1", "10.9.9.9", "172.31.0.1", "192.168.0.7", "fd00::5")
               if policy.address_refusal(a) is not None]

    assert len(refused) == 6
    assert policy.address_refusal("93.184.215.14") is None


def test_the_unspecified_address_counts_as_loopback():
    # Connecting to 0.0.0.0 or :: reaches this machine on Linux.
    policy = AddressPolicy(refused_networks=parse_networks("127.0.0.0/8,::1/128", setting="x"))

    assert policy.address_refusal("0.0.0.0") is not None
    assert policy.address_refusal("::") is not None


def test_allowed_networks_allow_only_their_addresses():
    policy = AddressPolicy(allowed_networks=parse_networks("10.20.0.0/16", setting="x"))

    assert policy.address_refusal("10.20.3.4") is None
    assert policy.address_refusal("::ffff:10.20.3.4") is None
    reason = policy.address_refusal("10.21.0.1")
    assert reason == ("it is in none of RECONCILER_SOURCE_ALLOWED_NETWORKS (10.20.0.0/16); "
                      "point source.url at an allowed host or add its network to that setting")


def test_a_refused_network_wins_over_an_allowed_one():
    policy = AddressPolicy(allowed_networks=parse_networks("169.254.0.0/16", setting="x"))

    assert policy.address_refusal("169.254.169.254") is not None


def test_a_long_allowed_list_is_shortened_in_the_reason():
    networks = ",".join(f"10.{n}.0.0/16" for n in range(10))
    policy = AddressPolicy(allowed_networks=parse_networks(networks, setting="x"))

    reason = policy.address_refusal("192.0.2.1")

    assert "10.0.0.0/16, 10.1.0.0/16, 10.2.0.0/16, 10.3.0.0/16 and 6 more" in reason


def test_allowed_hosts_match_exactly_or_below_a_leading_dot():
    policy = AddressPolicy(allowed_hosts=parse_hosts(
        "orders.example.com, .partners.example", setting="RECONCILER_SOURCE_ALLOWED_HOSTS"))

    assert policy.host_refusal("orders.example.com") is None
    assert policy.host_refusal("ORDERS.example.com.") is None
    assert policy.host_refusal("eu.partners.example") is None
    assert policy.host_refusal("partners.example") is not None
    assert policy.host_refusal("evilpartners.example") is not None
    assert policy.host_refusal("orders.example.com.evil.test") == (
        "source host orders.example.com.evil.test is not in RECONCILER_SOURCE_ALLOWED_HOSTS; "
        "point source.url at an allowed host or add this one to that setting")


def test_no_allowed_hosts_allow_every_host():
    assert DEFAULT.host_refusal("anything.example") is None


@pytest.mark.parametrize("text, problem", [
    ("10.1.2.3/8", "has host bits set"),
    ("10.0.0.0/33", "not a network"),
    ("metadata", "not a network"),
])
def test_a_bad_network_is_refused_naming_the_setting_and_entry(text, problem):
    with pytest.raises(ValueError) as raised:
        parse_networks(f"10.0.0.0/8, {text}", setting="RECONCILER_SOURCE_ALLOWED_NETWORKS")

    assert str(raised.value).startswith(f"RECONCILER_SOURCE_ALLOWED_NETWORKS: {text!r} ")
    assert problem in str(raised.value)


@pytest.mark.parametrize("text", ["http://orders.example", "orders.example:8080", "*.example",
                                  "a b"])
def test_a_bad_host_is_refused(text):
    with pytest.raises(ValueError, match="is not a host name"):
        parse_hosts(text, setting="RECONCILER_SOURCE_ALLOWED_HOSTS")


def test_settings_refuse_a_bad_network_at_start():
    with pytest.raises(ValueError, match="RECONCILER_SOURCE_REFUSED_NETWORKS: '169.254/16'"):
        Settings(RECONCILER_SOURCE_REFUSED_NETWORKS="169.254/16")


def test_settings_default_to_refusing_link_local_and_metadata_only():
    networks = parse_networks(Settings().source_refused_networks, setting="x")

    assert [str(n) for n in networks] == ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"]


def _addr_info(address: str, port: int = 80) -> tuple:
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))


def test_the_socket_factory_refuses_before_any_socket_exists():
    factory = _policed_socket_factory(DEFAULT)
    attempts: list = []
    token = _connect_attempts.set(attempts)
    try:
        with pytest.raises(AddressRefused) as raised:
            factory(_addr_info("169.254.169.254"))
    finally:
        _connect_attempts.reset(token)

    assert str(raised.value).startswith("refused to connect to 169.254.169.254: it is in "
                                        "169.254.0.0/16")
    assert attempts == [("169.254.169.254", DEFAULT.address_refusal("169.254.169.254"))]


def test_the_socket_factory_gives_an_unconnected_socket_for_an_allowed_address():
    factory = _policed_socket_factory(DEFAULT)

    sock = factory(_addr_info("127.0.0.1"))
    try:
        assert sock.family == socket.AF_INET
        with pytest.raises(OSError):
            sock.getpeername()  # not connected: aiohttp connects it afterwards
    finally:
        sock.close()
