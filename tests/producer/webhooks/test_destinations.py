"""The SSRF guard's ranges, its allowlist, and the config-time and delivery-time checks."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from producer.webhooks.destinations import RefusedDestination, check_url, parse_networks, refusal, resolve

REFUSED = {
    "127.0.0.1": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.1": "private",
    "fd00::1": "private",
    "169.254.169.254": "link-local",  # cloud metadata
    "fe80::1": "link-local",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "240.0.0.1": "reserved",
    "100.64.0.1": "not globally routable",  # shared address space (CGNAT)
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped: the kernel connects to 127.0.0.1
    "::ffff:10.0.0.1": "private",
}


@pytest.mark.parametrize(("address", "category"), sorted(REFUSED.items()))
def test_non_public_ranges_are_refused(address: str, category: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize("address", ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_allowed_networks_let_exactly_their_addresses_through() -> None:
    allowed = parse_networks("127.0.0.0/8, 10.1.2.3, fd00::/8")
    assert refusal(ipaddress.ip_address("127.0.0.9"), allowed) is None
    assert refusal(ipaddress.ip_address("10.1.2.3"), allowed) is None
    assert refusal(ipaddress.ip_address("10.1.2.4"), allowed) == "private"
    assert refusal(ipaddress.ip_address("fd00::5"), allowed) is None
    assert refusal(ipaddress.ip_address("::1"), allowed) == "loopback"
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not an IP network"):
        parse_networks("10.0.0.0/33")


def test_config_refuses_bad_urls_and_literal_refused_addresses() -> None:
    for url, message in [
        ("ftp://example.com/", "scheme must be http or https"),
        ("https:///path", "names no host"),
        ("https://example.com:99999/", "bad port"),
        ("https://exa mple.com/", "whitespace"),
        ("https://bad_host!/", "not a valid host name"),
        ("http://127.0.0.1:8080/", "127.0.0.1 is loopback"),
        ("http://[::1]/", "::1 is loopback"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is link-local"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_url(url)
    assert check_url("https://hooks.example.com/x?y=1").hostname == "hooks.example.com"
    assert check_url("http://127.0.0.1:8080/", parse_networks("127.0.0.1")).port == 8080
    assert check_url("http://localhost/").hostname == "localhost"  # a name: checked when delivering


def test_delivery_resolves_the_name_and_refuses_any_refused_answer() -> None:
    with pytest.raises(RefusedDestination, match="localhost resolves to 127.0.0.1, which is loopback"):
        asyncio.run(resolve("localhost", 80))
    assert asyncio.run(resolve("localhost", 80, parse_networks("127.0.0.0/8"))) == "127.0.0.1"
    with pytest.raises(RefusedDestination, match="10.0.0.1 is private"):
        asyncio.run(resolve("10.0.0.1", 80))
    assert asyncio.run(resolve("1.1.1.1", 443)) == "1.1.1.1"  # a literal public address: no lookup
