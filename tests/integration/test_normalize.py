"""No spelling of a path reaches the upstream under another route's policy
(docs/requests.md): route, policy, fingerprint and the forwarded request line
use the normalized target; absolute form gives its authority as Host;
userinfo, paths above the root and lower-case methods are 400 (and never
logged with their secrets); section 6: header names with an underscore are
dropped, an invalid Host is 400."""

import json

import pytest

from idemtest.assertions import assert_error, wait_until
from idemtest.http import parse_responses, post, raw, request


@pytest.fixture
def gate(idemgate, upstream):
    return idemgate({"upstream": upstream.url, "store": "memory",
                     "routes": [{"prefix": "/req", "upstream": upstream.url,
                                 "idempotency": {"required": True}}]})


def raw_request(port, line, headers=("Host: t",), body=b""):
    head = line + "\r\n" + "".join(h + "\r\n" for h in headers) + "Connection: close\r\n"
    if body:
        head += "Content-Length: %d\r\n" % len(body)
    data = raw(port, head.encode() + b"\r\n" + body, timeout=5)
    return parse_responses(data)


@pytest.mark.parametrize("target", ["/%72eq", "//req", "/./req", "/x/../req", "/%2e/req",
                                    "http://a/req", "HTTP://a:1/req", "/req%2F..%2F"])
def test_spellings_of_a_required_route_need_a_key(gate, upstream, target):
    before = upstream.stats()["total"]
    rs = raw_request(gate.port, "POST %s HTTP/1.1" % target, body=b"{}")
    assert len(rs) == 1, rs
    assert rs[0].status == 400, rs[0]
    assert json.loads(rs[0].body)["error"]["code"] in ("idempotency_key_required",
                                                        "bad_request"), rs[0]
    assert upstream.stats()["total"] == before  # nothing forwarded


@pytest.mark.parametrize("method", ["post", "Post", "pOST"])
def test_lower_case_method_is_400(gate, method):
    rs = raw_request(gate.port, "%s /req HTTP/1.1" % method, body=b"{}")
    assert_error(rs[0], 400, "bad_request")


def echo(gate, target, headers=("Host: t",)):
    rs = raw_request(gate.port, "GET %s HTTP/1.1" % target, headers)
    assert len(rs) == 1 and rs[0].status == 200, rs
    return json.loads(rs[0].body)


def test_upstream_receives_the_normalized_target(gate):
    assert echo(gate, "/a//b/./c/../%64?q=%2e%2e//")["path"] == "/a/b/d?q=%2e%2e//"
    assert echo(gate, "/a%2fb")["path"] == "/a%2Fb"


def test_absolute_form_authority_replaces_host(gate):
    doc = echo(gate, "http://api.example:8443/v1/x?y=1", ("Host: other",))
    assert doc["path"] == "/v1/x?y=1"
    hosts = [v for k, v in doc["headers"] if k.lower() == "host"]
    assert hosts == ["api.example:8443"]


@pytest.mark.parametrize("target", ["http://user:secret@host/x", "/../x", "/a/../../x",
                                    "/%zz", "/a#frag", "ftp://h/x", "x"])
def test_refused_targets_are_400_and_logged_without_secrets(gate, target):
    rs = raw_request(gate.port, "GET %s HTTP/1.1" % target)
    assert_error(rs[0], 400, "bad_request")
    assert "secret" not in gate.stderr()


@pytest.mark.parametrize("host", ["a b", "a/b", "a@b", "..", "a:99999", "[::1", ""])
def test_invalid_host_is_400(gate, host):
    rs = raw_request(gate.port, "GET /x HTTP/1.1", ("Host: " + host,))
    assert_error(rs[0], 400, "bad_request")


def test_valid_hosts_pass(gate):
    for host in ["example.com", "example.com:8080", "[::1]:80", "127.0.0.1"]:
        echo(gate, "/x", ("Host: " + host,))


def test_underscore_headers_are_dropped(gate):
    doc = echo(gate, "/x", ("Host: t", "X_Secret: 1", "X-Kept: 2"))
    names = [k.lower() for k, _ in doc["headers"]]
    assert "x_secret" not in names
    assert "x-kept" in names


def test_fingerprint_uses_the_normalized_target(gate, upstream):
    h = {"Idempotency-Key": "n-1", "Authorization": "Bearer k", "Content-Type": "application/json"}
    r1 = request(gate.port, "POST", "/req/a", h, b"{}")
    assert r1.status == 200
    r2 = request(gate.port, "POST", "/req/%61", h, b"{}")
    assert r2.status == 200 and r2.header("Idempotent-Replayed") == "true", r2
    r3 = request(gate.port, "POST", "/req//a", h, b"{}")
    assert r3.header("Idempotent-Replayed") == "true", r3


def test_access_line_has_the_normalized_path(gate):
    assert request(gate.port, "GET", "/p/./q").status == 200

    def paths():
        return [ln.get("path") for ln in gate.log_lines() if ln.get("msg") == "access"]
    assert wait_until(lambda: "/p/q" in paths()), paths()


def test_asterisk_form_only_for_options(gate):
    rs = raw_request(gate.port, "GET * HTTP/1.1")
    assert_error(rs[0], 400, "bad_request")


def test_covered_post_with_key_through_a_spelling(gate):
    r = post(gate.port, "/%72eq", "sp-1")
    assert r.status == 200
    assert json.loads(r.body)["path"] == "/req"
