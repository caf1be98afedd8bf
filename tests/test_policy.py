"""Pure logic: rule matching, path safety, policy validation with file/line/field, slots."""

from __future__ import annotations

import base64
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http

from spendgate.policy import (
    ConfigError,
    HostPattern,
    Rate,
    Rule,
    UnsafePath,
    first_match,
    host_matches,
    is_internal,
    parse_config,
    parse_duration,
    path_segments,
    resolve_credentials,
)
from spendgate.stages.authorize import RateLimiter
from spendgate.stages.identify import credential_slots, looks_real
from spendgate.vendors import REGISTRY, vendor_for_host


def match(rule: str, method: str, path: str) -> bool:
    return Rule.parse(rule).matches(method, path_segments(path))


@pytest.mark.parametrize(
    ("rule", "method", "path", "expected"),
    [
        ("POST /v1/charges", "POST", "/v1/charges", True),
        ("POST /v1/charges", "GET", "/v1/charges", False),
        ("POST /v1/charges", "POST", "/v1/charges/ch_1", False),
        ("GET /v1/charges/*", "GET", "/v1/charges/ch_1", True),
        ("GET /v1/charges/*", "GET", "/v1/charges", False),
        ("GET /v1/charges/*", "GET", "/v1/charges/ch_1/refunds", False),
        ("* /v1/payment_methods/**", "DELETE", "/v1/payment_methods/pm_1/detach", True),
        ("* /v1/payment_methods/**", "GET", "/v1/payment_methods", True),
        ("* /v1/payment_methods/**", "GET", "/v1/payment_methodsX", False),
        ("post /v1/charges", "POST", "/v1/charges", True),
        ("POST /2010-04-01/Accounts/*/Messages.json", "POST", "/2010-04-01/Accounts/AC1/Messages.json", True),
        ("POST /v1/charges", "POST", "//v1//charges/", True),
        ("POST /v1/charges", "POST", "/v1/%63harges", True),
    ],
)
def test_rule_matching(rule: str, method: str, path: str, expected: bool) -> None:
    assert match(rule, method, path) is expected


@pytest.mark.parametrize("path", ["/v1/../admin", "/v1/./x", "/v1/a%2Fb", "/v1/a%5cb", "/v1/%2e%2e/x", "/v1/a%00"])
def test_ambiguous_paths_are_unsafe(path: str) -> None:
    with pytest.raises(UnsafePath):
        path_segments(path)


@pytest.mark.parametrize("bad", ["POST", "POST v1/charges", "GET /v1/**/x", "GET /v1/ch*", "G3T /x", 5])
def test_bad_rules_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        Rule.parse(bad)


def test_deny_is_checked_first_by_authorize_semantics() -> None:
    deny = [Rule.parse("* /v1/payment_methods/**")]
    allow = [Rule.parse("* /v1/**")]
    segs = path_segments("/v1/payment_methods/pm_1")
    assert first_match(deny, "POST", segs) is not None
    assert first_match(allow, "POST", segs) is not None  # allow matches too; deny wins in the stage


@given(st.text(max_size=60))
def test_path_segments_never_crash_unexpectedly(path: str) -> None:
    try:
        segs = path_segments(path)
    except UnsafePath:
        return
    assert all(s and "/" not in s for s in segs)


@given(st.lists(st.sampled_from(["v1", "x", "*", "charges", "a.json"]), max_size=5),
       st.lists(st.sampled_from(["v1", "x", "charges", "a.json", "y"]), max_size=6))
def test_double_star_matches_any_rest(prefix: list[str], rest: list[str]) -> None:
    concrete = [("v1" if p == "*" else p) for p in prefix]
    rule = Rule.parse("GET /" + "/".join([*prefix, "**"]))
    assert rule.matches("GET", tuple(concrete + rest))


def test_durations_and_rates() -> None:
    assert parse_duration("10m") == 600 and parse_duration("1h") == 3600 and parse_duration(30) == 30
    with pytest.raises(ValueError):
        parse_duration("soon")
    assert Rate.parse("60/minute") == Rate(60, 60, "60/minute")
    with pytest.raises(ValueError):
        Rate.parse("0/minute")


def test_rate_limiter_gcra() -> None:
    lim, rate = RateLimiter(), Rate.parse("2/minute")
    assert lim.hit("k", rate, now=0) == 0
    assert lim.hit("k", rate, now=0) == 0
    wait = lim.hit("k", rate, now=0)
    assert 29 < wait <= 30
    assert lim.hit("k", rate, now=31) == 0
    assert lim.hit("other", rate, now=0) == 0


GOOD = """\
version: 1
vendors:
  stripe: {secret: env:SG_TEST_STRIPE}
fx: {eur: 1.08}
policies:
  p:
    vendors:
      stripe: {allow: ["POST /v1/charges"], max_request_usd: 20}
    budget: {key_usd: 50}
keys:
  - {id: smoke, token_sha256: "%s", policy: p, labels: {a: b}}
""" % ("a" * 64)


def test_good_policy_parses() -> None:
    cfg = parse_config(GOOD, "good.yaml")
    assert cfg.fx == {"EUR": Decimal("1.08")}
    assert cfg.policies["p"].vendors["stripe"].max_request_usd == Decimal(20)
    assert cfg.policies["p"].budget.key_usd == Decimal(50)
    assert cfg.policy_mode("p") == "enforce"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "p.yaml")
    return [str(p) for p in e.value.problems]


def test_errors_name_file_line_and_field() -> None:
    out = problems(GOOD.replace("env:SG_TEST_STRIPE", "sk_live_inline").replace("max_request_usd: 20", "max_request_usd: -1"))
    assert "p.yaml:3: vendors.stripe.secret: credentials must be a reference, env:NAME or file:PATH; inline secrets are not allowed" in out
    assert any(o.startswith("p.yaml:8: policies.p.vendors.stripe.max_request_usd") for o in out)


def test_unknown_fields_vendors_and_references() -> None:
    out = problems(GOOD.replace("budget:", "budgett:").replace("policy: p,", "policy: nope,"))
    assert any("p.yaml:9: policies.p.budgett: unknown field" in o for o in out)
    out = problems(GOOD.replace("policy: p,", "policy: nope,"))
    assert any("p.yaml:11: keys[0].policy: no policy named 'nope'" in o for o in out)
    out = problems(GOOD.replace("      stripe: {allow", "      paypal: {allow"))
    assert any("policies.p.vendors.paypal: unknown vendor 'paypal'" in o for o in out)


def test_yaml_syntax_error_has_line() -> None:
    out = problems("version: 1\npolicies: [oops\n")
    assert out and out[0].startswith("p.yaml:") and "invalid YAML" in out[0]


def test_credentials_resolve_from_env_and_file(tmp_path) -> None:  # noqa: ANN001
    cfg = parse_config(GOOD)
    with pytest.raises(ConfigError, match="SG_TEST_STRIPE is not set"):
        resolve_credentials(cfg, environ={})
    assert resolve_credentials(cfg, environ={"SG_TEST_STRIPE": "sk_test_x"}) == {"stripe": {"secret": "sk_test_x"}}
    secret = tmp_path / "s"
    secret.write_text("sk_test_file\n")
    cfg2 = parse_config(GOOD.replace("env:SG_TEST_STRIPE", f"file:{secret}"))
    assert resolve_credentials(cfg2, environ={}) == {"stripe": {"secret": "sk_test_file"}}


def test_egress_helpers() -> None:
    assert host_matches("api.example.com", [HostPattern.parse("*.example.com")])
    assert host_matches("10.1.2.3", [HostPattern.parse("10.0.0.0/8")])
    assert not host_matches("example.com", [HostPattern.parse("*.example.com")])
    for ip in ["127.0.0.1", "169.254.169.254", "10.0.0.1", "192.168.1.1", "::1", "::ffff:127.0.0.1", "fd00::1"]:
        assert is_internal(ip), ip
    assert not is_internal("8.8.8.8")


def test_vendor_identified_by_host() -> None:
    assert vendor_for_host("api.stripe.com").name == "stripe"
    assert vendor_for_host("API.Stripe.com.").name == "stripe"
    assert vendor_for_host("shop.myshopify.com").name == "shopify"
    assert vendor_for_host("api.stripe.com.evil.example") is None
    assert vendor_for_host("evilapi.stripe.com") is None


def test_credential_slots_and_real_keys() -> None:
    basic = base64.b64encode(b"AC123:vk_" + b"a" * 40).decode()
    h = http.Headers(authorization=f"Basic {basic}", x_vault_key="vk_" + "b" * 40)
    slots = dict(credential_slots(h, REGISTRY["twilio"]))
    assert slots["authorization:user"] == "AC123"
    assert slots["authorization:password"] == "vk_" + "a" * 40
    assert slots["x-vault-key"] == "vk_" + "b" * 40
    assert looks_real("sk_live_51abcdef") == "stripe"
    assert looks_real("sk-ant-api03-abcdefghij") == "anthropic"
    assert looks_real("sk-proj-abcdefghij") == "openai"
    assert looks_real("0123456789abcdef0123456789abcdef") == "twilio"
    assert looks_real("vk_" + "a" * 40) is None
    assert looks_real("AC0123456789abcdef0123456789abcdef") is None


def test_loop_breaker_counts_repeats_honours_idempotency_and_forgets() -> None:
    from spendgate.stages.budget import LoopBreaker

    lb = LoopBreaker()
    assert [lb.repeated("fp", None, 3, 60) for _ in range(4)] == [False, False, False, True]
    assert [lb.repeated("fp2", "idem-1", 2, 60) for _ in range(5)] == [False] * 5
    lb.PRUNE_EVERY = 1
    lb.repeated("other", None, 3, 0.0001)
    import time

    time.sleep(0.01)
    lb._longest_window = 0.001
    lb.repeated("x", None, 3, 0.0001)
    assert len(lb) == 1  # only the fingerprint just seen survives the sweep


def test_binary_credential_file_is_a_config_error(tmp_path) -> None:  # noqa: ANN001
    secret = tmp_path / "s"
    secret.write_bytes(b"\xff\xfe\x00binary")
    cfg = parse_config(GOOD.replace("env:SG_TEST_STRIPE", f"file:{secret}"))
    with pytest.raises(ConfigError, match="is not a text file"):
        resolve_credentials(cfg, environ={})


def test_header_dict_reads_headers_as_mitmproxy_does() -> None:
    from mitmproxy import http

    from spendgate.stages.budget import header_dict

    h = http.Headers([(b"Idempotency-Key", b"a"), (b"X-One", "é".encode()), (b"idempotency-key", b"b")])
    assert header_dict(h) == {k.lower(): v for k, v in h.items()} == {"idempotency-key": "a, b", "x-one": "é"}


def test_read_secret_is_the_one_reader_for_credentials_and_the_admin_token(tmp_path) -> None:  # noqa: ANN001
    from spendgate.admin import resolve_token
    from spendgate.policy import read_secret

    f, empty, binary = tmp_path / "s", tmp_path / "e", tmp_path / "b"
    f.write_text(" tok\n")
    empty.write_text("\n")
    binary.write_bytes(b"\xff\xfe\x00")
    cases = {
        "env:T": (("from-env", ""), "from-env"),
        "env:UNSET": ((None, "environment variable UNSET is not set"), None),
        "env:EMPTY": ((None, "environment variable EMPTY is not set"), None),
        f"file:{f}": (("tok", ""), "tok"),
        f"file:{empty}": ((None, f"{empty} is empty"), None),
        f"file:{binary}": ((None, f"{binary} is not a text file"), None),
        f"file:{tmp_path / 'no'}": ((None, f"cannot read {tmp_path / 'no'}: No such file or directory"), None),
    }
    env = {"T": "from-env", "EMPTY": ""}
    for ref, (secret, token) in cases.items():
        assert read_secret(ref, env) == secret, ref
        assert resolve_token(ref, env) == token, ref


def test_an_empty_credential_file_is_a_config_error(tmp_path) -> None:  # noqa: ANN001
    empty = tmp_path / "key"
    empty.write_text("")
    cfg = parse_config(GOOD.replace("env:SG_TEST_STRIPE", f"file:{empty}"))
    with pytest.raises(ConfigError, match=r"vendors\.stripe\.secret: .* is empty"):
        resolve_credentials(cfg, environ={})


def test_labels_parse_the_same_in_the_cli_and_the_admin_api() -> None:
    from spendgate.keys import parse_labels

    assert parse_labels(["run=42", "team=a=b", "empty="]) == {"run": "42", "team": "a=b", "empty": ""}
    for bad in ["run", "=42"]:
        with pytest.raises(ValueError, match="is not k=v"):
            parse_labels([bad])
