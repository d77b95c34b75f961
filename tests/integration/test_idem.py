"""Idempotency engine end to end (docs/requests.md, docs/errors.md), against both
stores (memory, and a real redis-server) wherever the behaviour is the same,
and over both protocols: every case runs over HTTP/1.1 on both stores and
over HTTP/2 (h2c, one stream per request unless the case says otherwise) on
the memory store, since the store never sees the protocol a request came
on (test_http2.py has the HTTP/2-only cases).
"""

import json
import time

import pytest

from idemtest.assertions import (after_release, assert_error, assert_in_progress,
                                 assert_replay_of, retry_while, wait_upstream_saw)
from idemtest.config import gate_config
from idemtest.http import BODY, hdrs
from idemtest.procs import Upstream, free_port
from idemtest.proto import refused
from idemtest.storm import Bg

pytestmark = pytest.mark.parametrize(
    ("store_cfg", "proto"), [("memory", "h1"), ("redis", "h1"), ("memory", "h2")],
    indirect=True, ids=["memory-h1", "redis-h1", "memory-h2"])


@pytest.fixture
def gate(idemgate, upstream, store_cfg):
    """gate(idem={...}, **top) starts idemgate on the test's store and
    upstream with those idempotency / top-level settings."""
    def start(idem=None, **top):
        return idemgate(gate_config(store_cfg, upstream.url, idem, **top))
    return start


def total(upstream):
    return upstream.stats()["total"]


# ---------------------------------------------------------------------------
# docs/requests.md: which requests are covered
# ---------------------------------------------------------------------------

def test_no_key_not_required_is_passthrough(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", None)
    r2 = proto.post(g.port, "/count", None)
    assert r1.status == 201 and r2.status == 201, (r1, r2)
    assert r1.json()["n"] == 1 and r2.json()["n"] == 2
    assert r1.header("Idempotent-Replayed") is None
    assert r2.header("Idempotent-Replayed") is None
    assert upstream.count("-") == 2


def test_no_key_required_is_400(gate, upstream, proto):
    g = gate(idem={"required": True})
    r = proto.post(g.port, "/count", None)
    assert_error(r, 400, "idempotency_key_required")
    assert total(upstream) == 0
    # a request with a key still goes through
    assert proto.post(g.port, "/count", "k-req").status == 201


def test_empty_key_is_400(gate, upstream, proto):
    g = gate()
    r = proto.post(g.port, "/count", "")
    assert_error(r, 400, "invalid_idempotency_key")
    assert total(upstream) == 0


def test_key_max_length_default_boundary(gate, upstream, proto):
    g = gate()
    ok = "a" * 255
    r = proto.post(g.port, "/count", ok)
    assert r.status == 201, r
    r = proto.post(g.port, "/count", "b" * 256)
    assert_error(r, 400, "invalid_idempotency_key")
    assert total(upstream) == 1


def test_key_max_length_configured_boundary(gate, upstream, proto):
    g = gate(idem={"key_max_length": 10})
    r = proto.post(g.port, "/count", "k" * 10)
    assert r.status == 201, r
    r = proto.post(g.port, "/count", "k" * 11)
    assert_error(r, 400, "invalid_idempotency_key")
    assert total(upstream) == 1


@pytest.mark.parametrize("key", [b"ab c", b"ab\x7fc", b"ab\xc3\xa9c",
                                 b"ab\tc", b"ab\x01c"],
                         ids=["space", "del", "non_ascii", "tab", "ctl"])
def test_key_with_invalid_byte_is_400(gate, upstream, key, proto):
    g = gate()
    r = proto.request(g.port, "POST", "/count",
                      [("Idempotency-Key", key), ("Authorization", "Bearer k1"),
                       ("Content-Type", "application/json")], BODY, allow_reset=True)
    # DEL and control bytes are not field-vchar (RFC 9110): a strict parser
    # may refuse them as malformed HTTP (400 bad_request, or over HTTP/2
    # the stream reset with PROTOCOL_ERROR) instead
    if not (key in (b"ab\x01c", b"ab\x7fc") and refused(r)):
        assert_error(r, 400, "invalid_idempotency_key")
    assert total(upstream) == 0


def test_visible_ascii_edges_are_valid(gate, upstream, proto):
    g = gate()
    key = "!~" + "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')
    r = proto.post(g.port, "/count", key)
    assert r.status == 201, r
    r2 = after_release(lambda: proto.post(g.port, "/count", key))
    assert_replay_of(r2, r)


def test_repeated_key_header_is_400(gate, upstream, proto):
    g = gate()
    h = [("Idempotency-Key", "rep1"), ("Idempotency-Key", "rep1"),
         ("Authorization", "Bearer k1"), ("Content-Type", "application/json")]
    r = proto.request(g.port, "POST", "/count", h, BODY)
    assert_error(r, 400, "invalid_idempotency_key")
    h = [("Idempotency-Key", "rep1"), ("Idempotency-Key", "rep2"),
         ("Authorization", "Bearer k1"), ("Content-Type", "application/json")]
    r = proto.request(g.port, "POST", "/count", h, BODY)
    assert_error(r, 400, "invalid_idempotency_key")
    assert total(upstream) == 0


def test_rfc8941_quoted_key_equals_bare_key(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", '"abc"')
    assert r1.status == 201, r1
    r2 = after_release(lambda: proto.post(g.port, "/count", "abc"))
    assert_replay_of(r2, r1)
    # and the other way round
    r3 = proto.post(g.port, "/count", "xyz")
    assert r3.status == 201, r3
    r4 = after_release(lambda: proto.post(g.port, "/count", '"xyz"'))
    assert_replay_of(r4, r3)
    assert upstream.count("abc") + upstream.count('"abc"') == 1


def test_rfc8941_escapes_unquoted(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", '"q\\"x\\\\y"')
    assert r1.status == 201, r1
    r2 = after_release(lambda: proto.post(g.port, "/count", 'q"x\\y'))
    assert_replay_of(r2, r1)


@pytest.mark.parametrize("key", ['"abc', '"a\\bc"', '""'],
                         ids=["unterminated", "bad_escape", "empty_quoted"])
def test_rfc8941_invalid_strings_are_400(gate, upstream, key, proto):
    g = gate()
    r = proto.post(g.port, "/count", key)
    assert_error(r, 400, "invalid_idempotency_key")
    assert total(upstream) == 0


def test_body_over_limit_is_413(gate, upstream, proto):
    g = gate(limits={"max_request_body_bytes": 1024})
    r = proto.post(g.port, "/count", "big1", body=b"x" * 1025)
    assert_error(r, 413, "payload_too_large")
    assert total(upstream) == 0
    r = proto.post(g.port, "/count", "big2", body=b"x" * 1024)
    assert r.status == 201, r
    assert total(upstream) == 1


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
def test_uncovered_methods_execute_every_time(gate, upstream, method, proto):
    g = gate()
    body = b"" if method in ("GET", "DELETE") else BODY
    r1 = proto.post(g.port, "/count", "m-" + method, body=body, method=method)
    r2 = proto.post(g.port, "/count", "m-" + method, body=body, method=method)
    assert r1.status == 201 and r2.status == 201, (r1, r2)
    assert r2.header("Idempotent-Replayed") is None, r2
    assert upstream.count("m-" + method) == 2


def test_patch_is_covered(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", "patch1", method="PATCH")
    assert r1.status == 201, r1
    r2 = after_release(lambda: proto.post(g.port, "/count", "patch1", method="PATCH"))
    assert_replay_of(r2, r1)
    assert upstream.count("patch1") == 1


def test_configured_methods(gate, upstream, proto):
    g = gate(idem={"methods": ["PUT"]})
    r1 = proto.post(g.port, "/count", "put1", method="PUT")
    r2 = after_release(lambda: proto.post(g.port, "/count", "put1", method="PUT"))
    assert_replay_of(r2, r1)
    assert proto.post(g.port, "/count", "post1").status == 201
    assert proto.post(g.port, "/count", "post1").status == 201
    assert upstream.count("put1") == 1
    assert upstream.count("post1") == 2


# -- scope --------------------------------------------------------------------

def test_scope_two_authorizations_execute_twice(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", "sc1", api_key="alice")
    r2 = proto.post(g.port, "/count", "sc1", api_key="bob")
    assert r1.status == 201 and r2.status == 201, (r1, r2)
    assert r2.header("Idempotent-Replayed") is None
    assert upstream.count("sc1") == 2
    # each credential replays its own record
    r3 = after_release(lambda: proto.post(g.port, "/count", "sc1", api_key="alice"))
    assert_replay_of(r3, r1)
    r4 = after_release(lambda: proto.post(g.port, "/count", "sc1", api_key="bob"))
    assert_replay_of(r4, r2)
    assert upstream.count("sc1") == 2


def test_scope_x_api_key(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", "xk1", api_key=None, extra=[("X-API-Key", "a")])
    r2 = proto.post(g.port, "/count", "xk1", api_key=None, extra=[("X-API-Key", "b")])
    assert r1.status == 201 and r2.status == 201, (r1, r2)
    assert r2.header("Idempotent-Replayed") is None
    r3 = after_release(lambda: proto.post(g.port, "/count", "xk1", api_key=None,
                                          extra=[("X-API-Key", "a")]))
    assert_replay_of(r3, r1)
    assert upstream.count("xk1") == 2


def test_scope_first_scope_header_wins(gate, upstream, proto):
    """Same Authorization, different X-API-Key: Authorization comes first in
    scope_headers, so both are one scope."""
    g = gate()
    r1 = proto.post(g.port, "/count", "fw1", api_key="same", extra=[("X-API-Key", "a")])
    r2 = after_release(lambda: proto.post(g.port, "/count", "fw1", api_key="same",
                                          extra=[("X-API-Key", "b")]))
    assert_replay_of(r2, r1)
    assert upstream.count("fw1") == 1


def test_scope_configured_scope_headers(gate, upstream, proto):
    g = gate(idem={"scope_headers": ["X-Tenant"]})
    r1 = proto.post(g.port, "/count", "tn1", api_key="a", extra=[("X-Tenant", "t1")])
    r2 = after_release(lambda: proto.post(g.port, "/count", "tn1", api_key="b",
                                          extra=[("X-Tenant", "t1")]))
    assert_replay_of(r2, r1)
    r3 = proto.post(g.port, "/count", "tn1", api_key="a", extra=[("X-Tenant", "t2")])
    assert r3.status == 201 and not r3.replayed, r3
    assert upstream.count("tn1") == 2


def test_anonymous_shared(gate, upstream, proto):
    g = gate()  # anonymous: shared is the default
    r1 = proto.post(g.port, "/count", "anon1", api_key=None)
    assert r1.status == 201, r1
    r2 = after_release(lambda: proto.post(g.port, "/count", "anon1", api_key=None))
    assert_replay_of(r2, r1)
    assert upstream.count("anon1") == 1
    # a credentialed request is another scope
    r3 = proto.post(g.port, "/count", "anon1", api_key="k1")
    assert r3.status == 201 and not r3.replayed, r3
    assert upstream.count("anon1") == 2


def test_anonymous_shared_explicit(gate, upstream, proto):
    g = gate(idem={"anonymous": "shared"})
    r1 = proto.post(g.port, "/count", "anon2", api_key=None)
    r2 = after_release(lambda: proto.post(g.port, "/count", "anon2", api_key=None))
    assert_replay_of(r2, r1)
    assert upstream.count("anon2") == 1


def test_anonymous_reject(gate, upstream, proto):
    g = gate(idem={"anonymous": "reject"})
    r = proto.post(g.port, "/count", "anon3", api_key=None)
    assert_error(r, 401, "credentials_required")
    assert total(upstream) == 0
    r = proto.post(g.port, "/count", "anon3", api_key="k1")
    assert r.status == 201, r


def test_anonymous_bypass(gate, upstream, proto):
    g = gate(idem={"anonymous": "bypass"})
    r1 = proto.post(g.port, "/count", "anon4", api_key=None)
    r2 = proto.post(g.port, "/count", "anon4", api_key=None)
    assert r1.status == 201 and r2.status == 201, (r1, r2)
    assert r2.header("Idempotent-Replayed") is None, r2
    assert upstream.count("anon4") == 2
    # with a credential the engine still applies
    r3 = proto.post(g.port, "/count", "anon5", api_key="k1")
    r4 = after_release(lambda: proto.post(g.port, "/count", "anon5", api_key="k1"))
    assert_replay_of(r4, r3)
    assert upstream.count("anon5") == 1


# ---------------------------------------------------------------------------
# docs/requests.md: the state machine
# ---------------------------------------------------------------------------

def test_first_executes_retry_replays(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", "st1")
    assert r1.status == 201, r1
    assert r1.header("Idempotent-Replayed") is None, r1
    assert r1.header("X-Exec") == "1", r1
    assert r1.json() == {"n": 1, "key": "st1"}
    r2 = after_release(lambda: proto.post(g.port, "/count", "st1"))
    assert_replay_of(r2, r1)
    assert r2.header("X-Exec") == "1"
    r3 = proto.post(g.port, "/count", "st1")
    assert_replay_of(r3, r1)
    assert upstream.count("st1") == 1


def test_replay_keeps_custom_headers_in_order(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/echo", "echo1")
    assert r1.status == 200, r1
    names = [k.lower() for k, _ in r1.headers]
    assert "x-upstream" in names and "x-custom" in names, r1
    r2 = after_release(lambda: proto.post(g.port, "/echo", "echo1"))
    assert_replay_of(r2, r1)
    assert r2.header("X-Custom") == "abc"
    assert r2.header("X-Upstream") == "echo"
    custom = [(k.lower(), v) for k, v in r2.headers
              if k.lower() in ("x-upstream", "x-custom")]
    assert custom == [("x-upstream", "echo"), ("x-custom", "abc")]
    assert upstream.count("echo1") == 1


def test_replay_over_keepalive_connection(gate, upstream, proto):
    """On one connection: a keep-alive one, or one stream per request on
    one HTTP/2 connection."""
    g = gate()
    with proto.client(g.port) as c:
        r1 = c.request("POST", "/count", hdrs("ka1"), BODY)
        assert r1.status == 201, r1
        r2 = after_release(lambda: c.request("POST", "/count", hdrs("ka1"), BODY))
        assert_replay_of(r2, r1)
        r3 = c.request("POST", "/count", hdrs("ka2"), BODY)
        assert r3.status == 201 and not r3.replayed, r3
    assert upstream.count("ka1") == 1


def test_in_progress_is_409(gate, upstream, proto):
    g = gate()
    first = Bg(proto.post, g.port, "/count?ms=2000", "ip1")
    wait_upstream_saw(upstream, "ip1")
    r = proto.post(g.port, "/count?ms=2000", "ip1")
    assert_in_progress(r)
    r1 = first.result()
    assert r1.status == 201 and not r1.replayed, r1
    r2 = after_release(lambda: proto.post(g.port, "/count?ms=2000", "ip1"))
    assert_replay_of(r2, r1)
    assert upstream.count("ip1") == 1


def test_reuse_while_in_progress(gate, upstream, proto):
    g = gate()
    first = Bg(proto.post, g.port, "/count?ms=2000", "ru1")
    wait_upstream_saw(upstream, "ru1")
    r = proto.post(g.port, "/count?ms=2000", "ru1", body=b'{"amount": 999}')
    assert_error(r, 409, "idempotency_key_reuse")
    assert first.result().status == 201
    assert upstream.count("ru1") == 1


def test_reuse_after_completion(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", "ru2")
    assert r1.status == 201
    r = after_release(lambda: proto.post(g.port, "/count", "ru2", body=b'{"amount": 999}'))
    assert_error(r, 409, "idempotency_key_reuse")
    # the original still replays
    assert_replay_of(proto.post(g.port, "/count", "ru2"), r1)
    assert upstream.count("ru2") == 1


def test_mismatch_status_422(gate, upstream, proto):
    g = gate(idem={"mismatch_status": 422})
    first = Bg(proto.post, g.port, "/count?ms=1500", "mm1")
    wait_upstream_saw(upstream, "mm1")
    r = proto.post(g.port, "/count?ms=1500", "mm1", body=b"{}")
    assert_error(r, 422, "idempotency_key_reuse")
    # same fingerprint while in progress is still 409 request_in_progress
    assert_in_progress(proto.post(g.port, "/count?ms=1500", "mm1"))
    assert first.result().status == 201
    r = after_release(lambda: proto.post(g.port, "/count?ms=1500", "mm1", body=b"{}"))
    assert_error(r, 422, "idempotency_key_reuse")
    assert upstream.count("mm1") == 1


FP_CASES = {
    # name: (first request kwargs, second request kwargs)
    "method": ({}, {"method": "PATCH"}),
    "path": ({}, {"path": "/echo"}),
    "query": ({"path": "/count?a=1"}, {"path": "/count?a=2"}),
    "query_added": ({}, {"path": "/count?a=1"}),
    "content_type": ({}, {"ctype": "text/plain"}),
    "content_type_absent": ({}, {"ctype": None}),
    "body": ({}, {"body": b'{"amount": 101}'}),
    "body_empty": ({}, {"body": b""}),
}


@pytest.mark.parametrize("case", sorted(FP_CASES))
def test_fingerprint_covers(gate, upstream, case, proto):
    g = gate()
    key = "fp-" + case
    a, b = FP_CASES[case]

    def req(kw):
        kw = dict(kw)
        path = kw.pop("path", "/count")
        return proto.post(g.port, path, key, **kw)

    r1 = req(a)
    assert r1.status in (200, 201) and not r1.replayed, r1
    r2 = after_release(lambda: req(b))
    assert_error(r2, 409, "idempotency_key_reuse")
    assert upstream.count(key) == 1


def test_fingerprint_ignores_other_headers(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/count", "fpo", extra=[("X-Other", "1"), ("Accept", "a/b")])
    r2 = after_release(lambda: proto.post(g.port, "/count", "fpo",
                                          extra=[("X-Other", "2")]))
    assert_replay_of(r2, r1)
    assert upstream.count("fpo") == 1


def test_fingerprint_headers_configured(gate, upstream, proto):
    g = gate(idem={"fingerprint_headers": ["Content-Type", "X-Tenant"]})
    r1 = proto.post(g.port, "/count", "fph", extra=[("X-Tenant", "a")])
    assert r1.status == 201
    r2 = after_release(lambda: proto.post(g.port, "/count", "fph",
                                          extra=[("X-Tenant", "b")]))
    assert_error(r2, 409, "idempotency_key_reuse")
    r3 = proto.post(g.port, "/count", "fph", extra=[("X-Tenant", "a")])
    assert_replay_of(r3, r1)
    assert upstream.count("fph") == 1


def test_fingerprint_headers_empty_list(gate, upstream, proto):
    """fingerprint_headers [] : Content-Type no longer matters."""
    g = gate(idem={"fingerprint_headers": []})
    r1 = proto.post(g.port, "/count", "fpe")
    r2 = after_release(lambda: proto.post(g.port, "/count", "fpe", ctype="text/plain"))
    assert_replay_of(r2, r1)
    assert upstream.count("fpe") == 1


# -- what is kept -------------------------------------------------------------

@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_not_kept(gate, upstream, status, proto):
    g = gate()
    path = "/count?status=%d" % status
    r1 = proto.post(g.port, path, "e5")
    assert r1.status == status and not r1.replayed, r1
    r2 = after_release(lambda: proto.post(g.port, path, "e5"))
    assert r2.status == status and not r2.replayed, r2
    assert r2.json()["n"] == 2
    assert upstream.count("e5") == 2


def test_5xx_kept_with_cache_5xx(gate, upstream, proto):
    g = gate(idem={"cache_5xx": True})
    r1 = proto.post(g.port, "/count?status=500", "e5c")
    assert r1.status == 500, r1
    r2 = after_release(lambda: proto.post(g.port, "/count?status=500", "e5c"))
    assert_replay_of(r2, r1)
    assert upstream.count("e5c") == 1


@pytest.mark.parametrize("status", [408, 409, 425, 429])
def test_retryable_4xx_not_kept(gate, upstream, status, proto):
    g = gate()
    path = "/count?status=%d" % status
    r1 = proto.post(g.port, path, "r4")
    assert r1.status == status and not r1.replayed, r1
    r2 = after_release(lambda: proto.post(g.port, path, "r4"))
    assert r2.status == status and not r2.replayed, r2
    assert r2.json()["n"] == 2
    assert upstream.count("r4") == 2


@pytest.mark.parametrize("status", [200, 202, 301, 400, 404, 410, 422])
def test_final_status_kept(gate, upstream, status, proto):
    g = gate()
    path = "/count?status=%d" % status
    r1 = proto.post(g.port, path, "k4")
    assert r1.status == status and not r1.replayed, r1
    r2 = after_release(lambda: proto.post(g.port, path, "k4"))
    assert_replay_of(r2, r1)
    assert upstream.count("k4") == 1


def test_status_endpoint_404_kept(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/status/404", "s404")
    assert r1.status == 404
    r2 = after_release(lambda: proto.post(g.port, "/status/404", "s404"))
    assert_replay_of(r2, r1)
    assert upstream.count("s404") == 1


def test_sse_not_kept(gate, upstream, proto):
    g = gate()
    path = "/sse?n=3&gap_ms=50"
    expect = b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    r1 = proto.post(g.port, path, "sse1")
    assert r1.status == 200, r1
    assert r1.header("Content-Type").startswith("text/event-stream")
    assert r1.body == expect
    r2 = after_release(lambda: proto.post(g.port, path, "sse1"))
    assert r2.status == 200 and not r2.replayed, r2
    assert r2.body == expect
    assert upstream.count("sse1") == 2


@pytest.mark.parametrize("endpoint", ["/big", "/bigchunked"])
def test_big_response_delivered_not_kept(gate, upstream, endpoint, proto):
    from upstream import big_body
    g = gate(idem={"max_cached_response_bytes": 1000})
    path = endpoint + "?bytes=50000"
    r1 = proto.post(g.port, path, "big")
    assert r1.status == 200 and not r1.replayed, r1
    assert r1.body == big_body(50000)
    r2 = after_release(lambda: proto.post(g.port, path, "big"))
    assert r2.status == 200 and not r2.replayed, r2
    assert r2.body == big_body(50000)
    assert upstream.count("big") == 2


@pytest.mark.parametrize("endpoint", ["/big", "/bigchunked"])
def test_response_at_limit_is_kept(gate, upstream, endpoint, proto):
    from upstream import big_body
    g = gate(idem={"max_cached_response_bytes": 1000})
    path = endpoint + "?bytes=1000"
    r1 = proto.post(g.port, path, "lim")
    assert r1.status == 200 and r1.body == big_body(1000), r1
    r2 = after_release(lambda: proto.post(g.port, path, "lim"))
    assert r2.replayed and r2.status == 200, r2
    assert r2.body == r1.body
    assert upstream.count("lim") == 1


def test_default_limit_keeps_large_response(gate, upstream, proto):
    from upstream import big_body
    g = gate()
    r1 = proto.post(g.port, "/big?bytes=500000", "big2")
    assert r1.body == big_body(500000)
    r2 = after_release(lambda: proto.post(g.port, "/big?bytes=500000", "big2"))
    assert_replay_of(r2, r1)
    assert upstream.count("big2") == 1


def test_upstream_down_502_then_released(idemgate, store_cfg, proto):
    port = free_port()
    g = idemgate(gate_config(store_cfg, "http://127.0.0.1:%d" % port))
    r = proto.post(g.port, "/count", "down1")
    assert_error(r, 502, "upstream_unavailable")
    up = Upstream(port)
    try:
        r2 = after_release(lambda: proto.post(g.port, "/count", "down1"))
        assert r2.status == 201 and not r2.replayed, r2
        assert up.count("down1") == 1
        r3 = after_release(lambda: proto.post(g.port, "/count", "down1"))
        assert_replay_of(r3, r2)
        assert up.count("down1") == 1
    finally:
        up.stop()


def test_upstream_timeout_504_then_released(gate, upstream, proto):
    g = gate(limits={"upstream_timeout_ms": 500})
    r = proto.post(g.port, "/count?ms=2000", "to1")
    assert_error(r, 504, "upstream_timeout")
    assert upstream.count("to1") == 1
    r2 = after_release(lambda: proto.post(g.port, "/count?ms=2000", "to1"))
    assert_error(r2, 504, "upstream_timeout")
    assert upstream.count("to1") == 2


def test_replay_excludes_set_cookie(gate, upstream, proto):
    g = gate()
    r1 = proto.post(g.port, "/echo", "cookie1")
    assert r1.header("Set-Cookie") == "s=1", r1
    assert r1.header("X-Custom") == "abc", r1
    r2 = after_release(lambda: proto.post(g.port, "/echo", "cookie1"))
    assert r2.replayed, r2
    assert r2.header("Set-Cookie") is None, r2
    assert r2.header("X-Custom") == "abc", r2
    # Server is in the default replay_exclude_headers: the upstream's is not replayed
    assert any("upstream-test" in v for v in r1.header_all("Server")), r1
    assert not any("upstream-test" in v for v in r2.header_all("Server")), r2
    assert_replay_of(r2, r1)


def test_replay_exclude_headers_configured(gate, upstream, proto):
    g = gate(idem={"replay_exclude_headers": ["X-Custom"]})
    r1 = proto.post(g.port, "/echo", "cookie2")
    assert r1.header("X-Custom") == "abc", r1
    r2 = after_release(lambda: proto.post(g.port, "/echo", "cookie2"))
    assert r2.replayed, r2
    assert r2.header("X-Custom") is None, r2
    assert r2.header("Set-Cookie") == "s=1", r2
    assert r2.header("X-Upstream") == "echo", r2
    assert r2.body == r1.body


def test_concurrent_wait_gets_replay(gate, upstream, proto):
    g = gate(idem={"concurrent": "wait", "wait_max_ms": 5000})
    first = Bg(proto.post, g.port, "/count?ms=1000", "cw1")
    wait_upstream_saw(upstream, "cw1")
    r = proto.post(g.port, "/count?ms=1000", "cw1")
    r1 = first.result()
    assert r1.status == 201 and not r1.replayed, r1
    assert_replay_of(r, r1)
    assert upstream.count("cw1") == 1


def test_concurrent_wait_times_out_with_409(gate, upstream, proto):
    g = gate(idem={"concurrent": "wait", "wait_max_ms": 200})
    first = Bg(proto.post, g.port, "/count?ms=2000", "cw2")
    wait_upstream_saw(upstream, "cw2")
    r = proto.post(g.port, "/count?ms=2000", "cw2")
    assert_in_progress(r)
    assert first.result().status == 201
    assert upstream.count("cw2") == 1


def test_concurrent_wait_mismatch_is_immediate(gate, upstream, proto):
    g = gate(idem={"concurrent": "wait", "wait_max_ms": 5000})
    first = Bg(proto.post, g.port, "/count?ms=1500", "cw3")
    wait_upstream_saw(upstream, "cw3")
    r = proto.post(g.port, "/count?ms=1500", "cw3", body=b"{}")
    assert_error(r, 409, "idempotency_key_reuse")
    assert first.result().status == 201


def test_client_disconnect_at_once_response_kept(gate, upstream, proto):
    g = gate()
    # over HTTP/2 the client closes the connection with the stream open
    s = proto.send(g.port, "/count?ms=1000", "dc1")
    s.close()
    wait_upstream_saw(upstream, "dc1")
    r = after_release(lambda: proto.post(g.port, "/count?ms=1000", "dc1"),
                      timeout=10.0, interval=0.1, must=True)
    assert r.status == 201 and r.replayed, r
    assert r.json() == {"n": 1, "key": "dc1"}
    assert upstream.count("dc1") == 1


def test_client_disconnect_while_upstream_works(gate, upstream, proto):
    g = gate()
    s = proto.send(g.port, "/count?ms=1000", "dc2")
    wait_upstream_saw(upstream, "dc2")
    s.close()
    r = after_release(lambda: proto.post(g.port, "/count?ms=1000", "dc2"),
                      timeout=10.0, interval=0.1, must=True)
    assert r.status == 201 and r.replayed, r
    assert r.json() == {"n": 1, "key": "dc2"}
    assert upstream.count("dc2") == 1


def test_route_idempotency_disabled(gate, upstream, proto):
    g = gate(routes=[{"prefix": "/noidem", "idempotency": {"enabled": False}}])
    r1 = proto.post(g.port, "/noidem/x", "rt1")
    r2 = proto.post(g.port, "/noidem/x", "rt1")
    assert r1.status == 200 and r2.status == 200, (r1, r2)
    assert r2.header("Idempotent-Replayed") is None, r2
    assert upstream.count("rt1") == 2
    # outside the route the engine still applies
    r3 = proto.post(g.port, "/count", "rt2")
    r4 = after_release(lambda: proto.post(g.port, "/count", "rt2"))
    assert_replay_of(r4, r3)
    assert upstream.count("rt2") == 1


def test_route_longest_prefix_wins(gate, upstream, proto):
    g = gate(routes=[{"prefix": "/no", "idempotency": {"enabled": False}},
                     {"prefix": "/noidem/on", "idempotency": {"enabled": True}}])
    r1 = proto.post(g.port, "/noidem/on/x", "lp1")
    r2 = after_release(lambda: proto.post(g.port, "/noidem/on/x", "lp1"))
    assert_replay_of(r2, r1)
    proto.post(g.port, "/noidem/off", "lp2")
    r4 = proto.post(g.port, "/noidem/off", "lp2")
    assert not r4.replayed, r4
    assert upstream.count("lp1") == 1
    assert upstream.count("lp2") == 2


def test_route_mismatch_status_override(gate, upstream, proto):
    g = gate(routes=[{"prefix": "/count", "idempotency": {"mismatch_status": 422}}])
    proto.post(g.port, "/count", "rm1")
    r = after_release(lambda: proto.post(g.port, "/count", "rm1", body=b"{}"))
    assert_error(r, 422, "idempotency_key_reuse")
    proto.post(g.port, "/echo", "rm2")
    r = after_release(lambda: proto.post(g.port, "/echo", "rm2", body=b"{}"))
    assert_error(r, 409, "idempotency_key_reuse")


def test_route_required_override(gate, upstream, proto):
    g = gate(routes=[{"prefix": "/count", "idempotency": {"required": True}}])
    assert_error(proto.post(g.port, "/count", None), 400, "idempotency_key_required")
    assert proto.post(g.port, "/echo", None).status == 200
    assert upstream.count("-") == 1


# -- docs/errors.md: error format --------------------------------------------

def test_error_format_problem(gate, upstream, proto):
    g = gate(error_format="problem", idem={"required": True})
    assert_error(proto.post(g.port, "/count", None), 400, "idempotency_key_required",
                 problem=True)
    assert_error(proto.post(g.port, "/count", "a b"), 400, "invalid_idempotency_key",
                 problem=True)
    first = Bg(proto.post, g.port, "/count?ms=1500", "pb1")
    wait_upstream_saw(upstream, "pb1")
    r = proto.post(g.port, "/count?ms=1500", "pb1")
    assert_in_progress(r, problem=True)
    r = proto.post(g.port, "/count?ms=1500", "pb1", body=b"{}")
    assert_error(r, 409, "idempotency_key_reuse", problem=True)
    assert first.result().status == 201


def test_error_format_problem_upstream_errors(idemgate, store_cfg, proto):
    g = idemgate(gate_config(store_cfg, "http://127.0.0.1:%d" % free_port(),
                             error_format="problem"))
    assert_error(proto.post(g.port, "/count", "pb2"), 502, "upstream_unavailable",
                 problem=True)


def test_error_format_json_explicit(gate, upstream, proto):
    g = gate(error_format="json", idem={"anonymous": "reject"})
    doc = assert_error(proto.post(g.port, "/count", "e1", api_key=None), 401,
                       "credentials_required")
    assert set(doc) == {"error"}, doc


def test_ttl_expiry(gate, upstream, proto):
    g = gate(idem={"ttl_seconds": 2})
    r1 = proto.post(g.port, "/count", "ttl1")
    r2 = after_release(lambda: proto.post(g.port, "/count", "ttl1"))
    assert_replay_of(r2, r1)
    time.sleep(2.2)
    r3 = retry_while(lambda: proto.post(g.port, "/count", "ttl1"), lambda r: r.replayed, 5, 0.2)
    assert r3.status == 201 and not r3.replayed, r3
    assert r3.json()["n"] == 2
    assert upstream.count("ttl1") == 2


def test_json_error_bodies_parse(gate, upstream, proto):
    """Every idemgate error above is one JSON document (no trailing bytes)."""
    g = gate(idem={"required": True})
    for r in (proto.post(g.port, "/count", None), proto.post(g.port, "/count", "")):
        json.loads(r.body.decode("utf-8"))
        assert r.header("Content-Length") == str(len(r.body)) or \
            r.header("Transfer-Encoding"), r
