"""Host patterns (``spendgate.hosts``): egress lists parsed once at load, one wildcard rule shared
with the vendor registry, and a malformed entry reported with file, line and field."""

from __future__ import annotations

import ipaddress

import pytest

from spendgate.hosts import HostPattern, host_matches, wildcard_matches
from spendgate.policy import ConfigError, parse_config
from spendgate.vendors import REGISTRY, vendor_for_host


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.Example.COM.", True),
        ("API.example.com.", "api.example.com", True),
        ("api.example.com", "x.api.example.com", False),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "evilexample.com", False),
        ("*.example.com", "example.com.evil.net", False),
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("10.1.2.3/8", "10.200.0.1", True),  # host bits set: the network
        ("10.0.0.5", "10.0.0.5", True),
        ("10.0.0.5", "10.0.0.6", False),
        ("10.0.0.0/8", "ten.example.com", False),  # a name is not in a network
        ("::1", "::1", True),
        ("fd00::/8", "fd12::1", True),
        ("fd00::/8", "10.0.0.1", False),
        ("localhost", "localhost", True),
        ("metadata.google.internal", "metadata.google.internal", True),
        ("_dmarc.example.com", "_dmarc.example.com", True),
    ],
)
def test_pattern_matches(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(host, [HostPattern.parse(pattern)]) is expected


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.1.1/8", "10.0.0/8x", "example.com:443", "https://example.com",
                                 "example.com/path", "*foo.com", "*", "*.", "foo..com", "exa mple.com", "", "  ",
                                 "[::1]", "a*.example.com", 5, None])
def test_malformed_patterns_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        HostPattern.parse(bad)


def test_a_malformed_egress_entry_is_a_load_error_with_file_line_field() -> None:
    text = """\
version: 1
egress:
  default: deny
  allow:
    - api.github.com
    - 10.0.0.0/33
  deny: ["ok.example", "bad.example:443"]
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "p.yaml")
    problems = sorted((p.line, p.field) for p in e.value.problems)
    assert problems == [(6, "egress.allow[1]"), (7, "egress.deny[1]")]
    assert "p.yaml:6: egress.allow[1]: '10.0.0.0/33' is not an IP address or CIDR" in str(e.value)
    assert "'bad.example:443' is not a host name" in str(e.value)


def test_egress_lists_are_parsed_at_load() -> None:
    cfg = parse_config("version: 1\negress: {allow: ['*.github.com', '10.0.0.0/8'], deny: [metadata.internal]}\n")
    allow = cfg.egress.allow
    assert all(isinstance(p, HostPattern) for p in [*allow, *cfg.egress.deny])
    assert allow[0].name == "*.github.com" and allow[1].network == ipaddress.ip_network("10.0.0.0/8")
    assert [p.text for p in allow] == ["*.github.com", "10.0.0.0/8"]


def test_vendor_hosts_use_the_same_wildcard_rule() -> None:
    for vendor in REGISTRY.values():
        for pattern in vendor.hosts:
            sub = pattern.replace("*", "shop") if pattern.startswith("*.") else pattern
            assert vendor_for_host(sub) is vendor
            assert wildcard_matches(sub, pattern)
            if pattern.startswith("*."):
                assert not vendor.serves(pattern[2:]) or pattern[2:] in vendor.hosts


def test_vendor_for_host_follows_every_change_to_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers are remembered per host (a request asks three or four times), for the registry as it was."""
    import dataclasses

    assert vendor_for_host("api.newvendor.example") is None
    assert vendor_for_host("api.stripe.com") is REGISTRY["stripe"]
    other = dataclasses.replace(REGISTRY["stripe"], name="newvendor", hosts=("api.newvendor.example",))
    monkeypatch.setitem(REGISTRY, "newvendor", other)
    assert vendor_for_host("api.newvendor.example") is other
    twin = dataclasses.replace(REGISTRY["stripe"])  # equal, not the same object: answered with the new one
    monkeypatch.setitem(REGISTRY, "stripe", twin)
    assert vendor_for_host("api.stripe.com") is twin
    monkeypatch.undo()
    assert vendor_for_host("api.newvendor.example") is None
    assert vendor_for_host("api.stripe.com") is REGISTRY["stripe"]
