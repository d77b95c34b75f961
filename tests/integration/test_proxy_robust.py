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
