"""Access lines let an operator find a key (docs/logs.md): `scope` (the
first 16 hex digits of the scope hash) and `key` on covered requests,
`trace_id` from a valid W3C traceparent; never the credential."""

import hashlib

from idemtest.assertions import wait_until
from idemtest.http import post, request


def test_scope_key_and_trace_id(idemgate, upstream):
    g = idemgate({"upstream": upstream.url, "store": "memory"})
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = post(g.port, "/count", "order-77", api_key="sk_live_secret",
             extra={"traceparent": tp})
    assert r.status == 201
    assert wait_until(lambda: len(g.access_lines()) == 1)
    ln = g.access_lines()[0]
    scope = hashlib.sha256(b"Bearer sk_live_secret").hexdigest()[:16]
    assert ln["scope"] == scope, ln
    assert ln["key"] == "order-77", ln
    assert ln["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736", ln
    assert "sk_live_secret" not in g.stderr()


def test_no_scope_without_key_and_bad_traceparents_ignored(idemgate, upstream):
    g = idemgate({"upstream": upstream.url, "store": "memory"})
    bad = ["", "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
           "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
           "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
           "zz"]
    for tp in bad:
        assert request(g.port, "GET", "/echo", {"traceparent": tp}).status == 200
    assert wait_until(lambda: len(g.access_lines()) == len(bad))
    for ln in g.access_lines():
        assert "scope" not in ln and "key" not in ln and "trace_id" not in ln, ln


def test_anonymous_scope(idemgate, upstream):
    g = idemgate({"upstream": upstream.url, "store": "memory"})
    assert post(g.port, "/count", "anon-1", api_key=None).status == 201
    assert wait_until(lambda: len(g.access_lines()) == 1)
    assert g.access_lines()[0]["scope"] == "anonymous"
    assert g.access_lines()[0]["key"] == "anon-1"
