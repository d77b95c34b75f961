"""No spelling of a path reaches the upstream under another route's policy
(docs/requests.md): route, policy, fingerprint and the forwarded request line
use the normalized target; absolute form gives its authority as Host;
userinfo, paths above the root and lower-case methods are 400 (and never
logged with their secrets); section 6: header names with an underscore are
dropped, an invalid Host is 400.

Each case runs over HTTP/1.1 and HTTP/2 (the `proto` fixture; over HTTP/2
the target is :path and the Host :authority, and a request nghttp2 finds
malformed may be refused with a PROTOCOL_ERROR stream reset instead of
400 bad_request, as RFC 9113 section 8.1.1 allows), but the absolute form,
which HTTP/2 does not have."""

import json

import pytest

from idemtest.assertions import assert_error, wait_until
from idemtest.http import parse_responses, raw
from idemtest.proto import refused


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


def send(proto, port, method, target, headers=("Host: t",), body=b""):
    """One request with any target: over HTTP/1.1 as raw bytes (one answer
    expected), over HTTP/2 with the target as :path (a stream the server
    resets is a Resp with status 0 and its reset_code)."""
    if proto.h2:
        pairs = [tuple(h.split(": ", 1)) if ": " in h else (h.rstrip(":"), "")
                 for h in headers]
        return proto.request(port, method, target, pairs, body, allow_reset=True)
    rs = raw_request(port, "%s %s HTTP/1.1" % (method, target), headers, body)
    assert len(rs) == 1, rs
    return rs[0]


def assert_refused(r):
    """400 bad_request, or over HTTP/2 the stream reset as malformed."""
    if getattr(r, "reset_code", None) is None:
        assert_error(r, 400, "bad_request")
    assert refused(r), r


@pytest.mark.parametrize("target", ["/%72eq", "//req", "/./req", "/x/../req", "/%2e/req",
                                    "http://a/req", "HTTP://a:1/req", "/req%2F..%2F"])
def test_spellings_of_a_required_route_need_a_key(gate, upstream, proto, target):
    before = upstream.stats()["total"]
    r = send(proto, gate.port, "POST", target, body=b"{}")
    if not refused(r):
        assert r.status == 400, r
        assert json.loads(r.body)["error"]["code"] == "idempotency_key_required", r
    assert upstream.stats()["total"] == before  # nothing forwarded


@pytest.mark.parametrize("proto", ["h1", "h2"], indirect=True)
@pytest.mark.parametrize("method", ["post", "Post", "pOST"])
def test_lower_case_method_is_400(gate, upstream, proto, method):
    assert_refused(send(proto, gate.port, method, "/req", body=b"{}"))
    assert upstream.stats()["total"] == 0


def echo(gate, target, headers=("Host: t",), proto=None):
    if proto is None:
        rs = raw_request(gate.port, "GET %s HTTP/1.1" % target, headers)
        assert len(rs) == 1, rs
        r = rs[0]
    else:
        r = send(proto, gate.port, "GET", target, headers)
    assert r.status == 200, r
    return json.loads(r.body)


def test_upstream_receives_the_normalized_target(gate, proto):
    assert echo(gate, "/a//b/./c/../%64?q=%2e%2e//", proto=proto)["path"] == \
        "/a/b/d?q=%2e%2e//"
    assert echo(gate, "/a%2fb", proto=proto)["path"] == "/a%2Fb"


def test_absolute_form_authority_replaces_host(gate):
    doc = echo(gate, "http://api.example:8443/v1/x?y=1", ("Host: other",))
    assert doc["path"] == "/v1/x?y=1"
    hosts = [v for k, v in doc["headers"] if k.lower() == "host"]
    assert hosts == ["api.example:8443"]


@pytest.mark.parametrize("target", ["http://user:secret@host/x", "/../x", "/a/../../x",
                                    "/%zz", "/a#frag", "ftp://h/x", "x"])
def test_refused_targets_are_400_and_logged_without_secrets(gate, upstream, proto, target):
    assert_refused(send(proto, gate.port, "GET", target))
    assert "secret" not in gate.stderr()
    assert upstream.stats()["total"] == 0


@pytest.mark.parametrize("host", ["a b", "a/b", "a@b", "..", "a:99999", "[::1", ""])
def test_invalid_host_is_400(gate, upstream, proto, host):
    assert_refused(send(proto, gate.port, "GET", "/x", ("Host: " + host,)))
    assert upstream.stats()["total"] == 0


def test_valid_hosts_pass(gate, proto):
    for host in ["example.com", "example.com:8080", "[::1]:80", "127.0.0.1"]:
        echo(gate, "/x", ("Host: " + host,), proto)


def test_underscore_headers_are_dropped(gate, proto):
    doc = echo(gate, "/x", ("Host: t", "X_Secret: 1", "X-Kept: 2"), proto)
    names = [k.lower() for k, _ in doc["headers"]]
    assert "x_secret" not in names
    assert "x-kept" in names


def test_fingerprint_uses_the_normalized_target(gate, upstream, proto):
    h = {"Idempotency-Key": "n-1", "Authorization": "Bearer k", "Content-Type": "application/json"}
    r1 = proto.request(gate.port, "POST", "/req/a", h, b"{}")
    assert r1.status == 200
    r2 = proto.request(gate.port, "POST", "/req/%61", h, b"{}")
    assert r2.status == 200 and r2.header("Idempotent-Replayed") == "true", r2
    r3 = proto.request(gate.port, "POST", "/req//a", h, b"{}")
    assert r3.header("Idempotent-Replayed") == "true", r3


def test_access_line_has_the_normalized_path(gate, proto):
    assert proto.request(gate.port, "GET", "/p/./q").status == 200

    def paths():
        return [ln.get("path") for ln in gate.log_lines() if ln.get("msg") == "access"]
    assert wait_until(lambda: "/p/q" in paths()), paths()


def test_asterisk_form_only_for_options(gate, proto):
    assert_refused(send(proto, gate.port, "GET", "*"))


def test_covered_post_with_key_through_a_spelling(gate, proto):
    r = proto.post(gate.port, "/%72eq", "sp-1")
    assert r.status == 200
    assert json.loads(r.body)["path"] == "/req"
