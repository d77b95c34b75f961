"""Robustness cases found in review: a long pipeline answered at once (no
recursion), a pipelining client that does not read (bounded memory),
close-delimited upstream answers (the FIN that comes with the last data),
Connection: close clients that stop reading (closed by client_timeout_ms),
chunk framing counted against the body limit, and the access line of an
exchange whose client left."""

import json
import socket
import threading
import time

from idemtest.assertions import wait_until
from idemtest.http import metrics, parse_responses, post, post_bytes, raw, request
from idemtest.procs import RawServer, free_port, rss_kib


def test_long_pipeline_of_immediate_answers(idemgate, upstream):
    """3000 pipelined requests each refused at once (empty key): served in
    order from the event loop, not by recursing per request."""
    g = idemgate({"upstream": upstream.url, "store": "memory"})
    one = b"POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key:\r\nContent-Length: 0\r\n\r\n"
    n = 3000
    s = socket.create_connection(("127.0.0.1", g.port), timeout=30)
    threading.Thread(target=s.sendall, args=(one * n,), daemon=True).start()
    got = b""
    deadline = time.monotonic() + 60
    while got.count(b"HTTP/1.1 400") < n and time.monotonic() < deadline:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    s.close()
    assert got.count(b"HTTP/1.1 400") == n
    assert g.alive()
    assert upstream.stats()["total"] == 0


def test_pipelining_client_that_does_not_read(idemgate, upstream):
    """Replays of a 1 MB answer pipelined by a client that reads nothing:
    idemgate stops taking requests once 1 MiB waits, memory stays bounded."""
    g = idemgate({"upstream": upstream.url, "store": "memory",
                  "idempotency": {"max_cached_response_bytes": 2000000}})
    assert post(g.port, "/big?bytes=1000000", "big-1", b"{}").status == 200
    before = rss_kib(g.proc.pid)
    one = b"".join(post_bytes("/big?bytes=1000000", "big-1", b"{}", host="a"))
    s = socket.create_connection(("127.0.0.1", g.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(one * 300)
    time.sleep(2)
    grown = rss_kib(g.proc.pid) - before
    s.close()
    # 300 queued replays would be ~300 MB; the bound is a few MiB
    assert grown < 64 * 1024, "RSS grew by %d KiB" % grown
    assert upstream.count("big-1") == 1


def answer_close_delimited(c):
    """Answers a request without a length and closes right after the body,
    so the FIN often rides with the last data."""
    d = b""
    while b"\r\n\r\n" not in d:
        chunk = c.recv(65536)
        if not chunk:
            break
        d += chunk
    c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n"
              + b"hello world" * 10)
    c.close()


def test_close_delimited_upstream(idemgate):
    up = RawServer(answer_close_delimited)
    try:
        g = idemgate({"upstream": "http://127.0.0.1:%d" % up.port, "store": "memory",
                      "limits": {"upstream_timeout_ms": 20000}})
        for _ in range(10):
            t0 = time.monotonic()
            r = request(g.port, "GET", "/x", timeout=30)
            assert r.status == 200
            assert r.body == b"hello world" * 10
            # a stall would last upstream_timeout_ms (20 s) and cut the body
            assert time.monotonic() - t0 < 15
    finally:
        up.close()


def test_connection_close_client_that_stops_reading(idemgate, upstream):
    """After a Connection: close answer the client never reads: idemgate
    must drop it after client_timeout_ms, not hold it (and ~1 MiB) forever."""
    admin = free_port()
    g = idemgate({"upstream": upstream.url, "store": "memory",
                  "admin": {"listen": "127.0.0.1:%d" % admin},
                  "limits": {"client_timeout_ms": 1000}})
    s = socket.create_connection(("127.0.0.1", g.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /big?bytes=4000000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    active = wait_until(lambda: metrics(admin).get("idemgate_connections_active") == 0,
                        15, 0.2)
    s.close()
    assert active, metrics(admin).get("idemgate_connections_active")


def test_chunk_framing_counts_against_body_limit(idemgate, upstream):
    g = idemgate({"upstream": upstream.url, "store": "memory",
                  "limits": {"max_request_body_bytes": 10000}})
    chunk = b"1;" + b"e" * 1000 + b"\r\nx\r\n"
    body = chunk * 200  # 200 decoded bytes, ~200 KB of framing
    out = raw(g.port, b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
              + body + b"0\r\n\r\n", timeout=10)
    rs = parse_responses(out)
    assert rs and rs[0].status == 413
    assert upstream.stats()["total"] == 0


def test_access_line_for_a_client_that_left(idemgate, upstream):
    """The client resets its connection while a large answer streams: the
    exchange goes on without it and is still logged and counted."""
    import struct
    g = idemgate({"upstream": upstream.url, "store": "memory"})
    s = socket.create_connection(("127.0.0.1", g.port))
    s.sendall(b"POST /big?bytes=8000000 HTTP/1.1\r\nHost: a\r\nIdempotency-Key: gone-1\r\n"
              b"Content-Length: 2\r\n\r\n{}")
    assert s.recv(1024).startswith(b"HTTP/1.1 200")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST: idemgate's next write fails and the client is gone
    found = wait_until(lambda: [ln for ln in g.access_lines() if ln.get("path") == "/big"],
                       15, 0.1)
    assert found, "no access line for the exchange whose client left"
    assert found[-1]["status"] == 200 and found[-1]["outcome"] == "not_cached"


def test_request_timeout_answer_follows_error_format(idemgate, upstream):
    """The 408 for a request not received in time is one of our errors like
    the others: with error_format "problem" it is RFC 9457."""
    g = idemgate({"upstream": upstream.url, "store": "memory", "error_format": "problem",
                  "limits": {"client_timeout_ms": 500}})
    out = raw(g.port, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
              timeout=10)
    rs = parse_responses(out)
    assert rs and rs[0].status == 408, out[:300]
    assert rs[0].header("Content-Type") == "application/problem+json"
    body = json.loads(rs[0].body)
    assert body["status"] == 408 and "code" in body
    assert upstream.stats()["total"] == 0


# -- every refusal is visible: an access line, a count, its request id --------

REJECTED = 'idemgate_requests_total{outcome="rejected"}'


def refusing_gate(idemgate, upstream, **limits):
    admin = free_port()
    lim = {"max_request_body_bytes": 100, "max_header_bytes": 2048}
    lim.update(limits)
    g = idemgate({"upstream": upstream.url, "store": "memory",
                  "admin": {"listen": "127.0.0.1:%d" % admin}, "limits": lim})
    return g, admin


def refused(g, admin, data, status, method, path, timeout=10):
    """Sends data, expects one answer with status and the connection closed;
    returns its access line, checked, once the rejected count moved."""
    before = metrics(admin).get(REJECTED, 0)
    n = len(g.access_lines())
    rs = parse_responses(raw(g.port, data, timeout=timeout))
    assert rs and rs[0].status == status, rs
    rid = rs[0].header("X-Request-Id")
    assert rid, rs[0]
    assert wait_until(lambda: len(g.access_lines()) == n + 1)
    ln = g.access_lines()[-1]
    assert ln["status"] == status and ln["outcome"] == "rejected", ln
    assert ln["request_id"] == rid, (ln, rid)
    assert ln["method"] == method and ln["path"] == path, ln
    for field in ("ts", "duration_ms", "upstream_ms"):
        assert field in ln, ln
    assert wait_until(lambda: metrics(admin).get(REJECTED, 0) == before + 1)
    return ln, rs[0]


def test_payload_too_large_is_logged_counted_and_names_its_limit(idemgate, upstream):
    g, admin = refusing_gate(idemgate, upstream)
    # the path logged is the normalized one, as for an exchange
    _, r = refused(g, admin, b"POST /big//./x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n"
                   b"X-Request-Id: client-rid-7\r\n\r\n", 413, "POST", "/big/x")
    assert r.header("X-Request-Id") == "client-rid-7"
    err = json.loads(r.body)["error"]
    assert err["code"] == "payload_too_large"
    assert err["message"] == "The request body exceeds the maximum of 100 bytes."
    # a chunked body found too large while it is read: the same
    chunk = b"40\r\n" + b"x" * 64 + b"\r\n"
    refused(g, admin, b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk * 2 + b"0\r\n\r\n", 413, "POST", "/chunked")
    assert upstream.stats()["total"] == 0


def test_headers_too_large_is_logged_and_counted(idemgate, upstream):
    g, admin = refusing_gate(idemgate, upstream)
    _, r = refused(g, admin, b"GET /h HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 4000
                   + b"\r\n\r\n", 431, "GET", "/h")
    assert json.loads(r.body)["error"]["message"] == \
        "The request head exceeds the maximum of 2048 bytes or of 100 header fields."


def test_bad_requests_are_logged_and_counted(idemgate, upstream):
    g, admin = refusing_gate(idemgate, upstream)
    # not HTTP at all: no method or path to log
    refused(g, admin, b"GARBAGE\r\n\r\n", 400, "", "")
    # a refused target is not logged (it may carry userinfo)
    refused(g, admin, b"GET /a/../../etc HTTP/1.1\r\nHost: a\r\n\r\n", 400, "GET", "")
    refused(g, admin, b"GET http://u:pw-secret@h/x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "GET",
            "")
    assert "pw-secret" not in g.stderr()
    # a bad Host
    refused(g, admin, b"GET /h HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "GET", "/h")
    # a version we do not speak
    refused(g, admin, b"GET /v HTTP/2.0\r\nHost: a\r\n\r\n", 505, "GET", "/v")
    assert upstream.stats()["total"] == 0


def test_request_timeout_is_logged_and_counted(idemgate, upstream):
    g, admin = refusing_gate(idemgate, upstream, client_timeout_ms=300)
    ln, _ = refused(g, admin, b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
                    408, "POST", "/slow")
    assert ln["duration_ms"] >= 250, ln


def test_invalid_key_names_its_limit(idemgate, upstream):
    g = idemgate({"upstream": upstream.url, "store": "memory",
                  "routes": [{"prefix": "/short", "idempotency": {"key_max_length": 8}}]})
    r = post(g.port, "/count", "k" * 256)
    assert r.status == 400
    assert json.loads(r.body)["error"] == {
        "type": "invalid_request_error", "code": "invalid_idempotency_key",
        "message": "The Idempotency-Key header must appear once and hold 1 to 255 "
                   "visible ASCII characters."}
    # the route's own limit
    r = post(g.port, "/short/x", "k" * 9)
    assert r.status == 400
    assert "hold 1 to 8 visible" in json.loads(r.body)["error"]["message"]
    assert wait_until(lambda: len(g.access_lines()) == 2)
    assert all(ln["outcome"] == "rejected" and ln["status"] == 400 for ln in g.access_lines())
