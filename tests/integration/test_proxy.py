"""Transparent proxying (docs/errors.md, docs/headers.md, docs/logs.md), end to end with the
memory store: methods, bodies, forwarding headers, hop-by-hop filtering,
keep-alive on both sides, limits, routes, SSE, upstream failures, shutdown,
access logs."""

import hashlib
import json
import os
import signal
import socket
import threading
import time

import pytest

from idemtest.assertions import assert_error, wait_until
from idemtest.http import (Client, Resp, dechunk, parse_responses, raw, raw_closed,
                           recv_to_close, recv_until_closed, request, split_head)
from idemtest.procs import free_port, have_ipv6_loopback, wait_port
from idemtest.storm import in_threads
from upstream import big_body


def start(idemgate, upstream, limits=None, **extra):
    cfg = {"upstream": upstream.url if hasattr(upstream, "url") else upstream,
           "store": "memory"}
    if limits:
        cfg["limits"] = limits
    cfg.update(extra)
    return idemgate(cfg)


def echo_headers(resp):
    return [(k, v) for k, v in resp.json()["headers"]]


def hvals(pairs, name):
    return [v for k, v in pairs if k.lower() == name.lower()]


# -- methods, targets, bodies -------------------------------------------------


def test_get_proxied_with_path_and_query(idemgate, upstream):
    g = start(idemgate, upstream)
    r = request(g.port, "GET", "/echo?a=1&b=two%20x&c")
    assert r.status == 200, r
    j = r.json()
    assert j["method"] == "GET"
    assert j["path"] == "/echo?a=1&b=two%20x&c"
    assert j["body_len"] == 0
    assert r.header("X-Upstream") == "echo"
    assert r.header("X-Custom") == "abc"
    assert upstream.stats()["total"] == 1


def test_post_proxied_with_body_intact(idemgate, upstream):
    g = start(idemgate, upstream)
    body = bytes(range(256)) * 4 + b"\r\n\r\nend"
    r = request(g.port, "POST", "/echo?x=1",
                {"Content-Type": "application/octet-stream"}, body)
    assert r.status == 200, r
    j = r.json()
    assert j["method"] == "POST"
    assert j["path"] == "/echo?x=1"
    assert j["body_len"] == len(body)
    assert j["body"].encode("latin-1") == body
    assert hvals(echo_headers(r), "Content-Type") == ["application/octet-stream"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_proxied(idemgate, upstream, method):
    g = start(idemgate, upstream)
    r = request(g.port, method, "/echo/m", body=b"abc")
    assert r.status == 200, r
    assert r.json()["method"] == method
    assert r.json()["body"] == "abc"


def test_head_has_no_body(idemgate, upstream):
    g = start(idemgate, upstream)
    c = Client(g.port)
    r = c.request("HEAD", "/big?bytes=1000")
    assert r.status == 200
    assert r.body == b""
    assert r.header("Content-Length") == "1000"
    r2 = c.request("GET", "/echo")  # the connection is still in sync
    assert r2.status == 200 and r2.json()["method"] == "GET"
    c.close()


def test_upstream_status_and_body_passed_through(idemgate, upstream):
    g = start(idemgate, upstream)
    r = request(g.port, "GET", "/status/404")
    assert r.status == 404
    assert r.json()["status"] == 404
    r = request(g.port, "GET", "/status/500")
    assert r.status == 500
    assert r.json()["status"] == 500


# -- forwarding headers ---------------------------------------------------------


def test_client_host_forwarded_unchanged(idemgate, upstream):
    g = start(idemgate, upstream)
    r = request(g.port, "GET", "/echo", {"Host": "api.example.com:8443"})
    assert r.status == 200
    assert hvals(echo_headers(r), "Host") == ["api.example.com:8443"]


def test_x_forwarded_for_appended(idemgate, upstream):
    g = start(idemgate, upstream)
    r = request(g.port, "GET", "/echo", {"X-Forwarded-For": "10.1.2.3"})
    hs = echo_headers(r)
    xff = ", ".join(hvals(hs, "X-Forwarded-For"))
    assert xff == "10.1.2.3, 127.0.0.1", hs
    assert hvals(hs, "X-Forwarded-Proto") == ["http"], hs


def test_x_forwarded_for_added_when_absent(idemgate, upstream):
    g = start(idemgate, upstream)
    hs = echo_headers(request(g.port, "GET", "/echo"))
    assert hvals(hs, "X-Forwarded-For") == ["127.0.0.1"], hs
    assert hvals(hs, "X-Forwarded-Proto") == ["http"], hs


def test_request_id_passed_through(idemgate, upstream):
    g = start(idemgate, upstream)
    r = request(g.port, "GET", "/echo", {"X-Request-Id": "rid-abc-123"})
    assert hvals(echo_headers(r), "X-Request-Id") == ["rid-abc-123"]
    assert r.header("X-Request-Id") == "rid-abc-123"


def test_request_id_generated_when_absent(idemgate, upstream):
    g = start(idemgate, upstream)
    ids = []
    for _ in range(2):
        r = request(g.port, "GET", "/echo")
        rid = r.header("X-Request-Id")
        assert rid, r
        assert hvals(echo_headers(r), "X-Request-Id") == [rid]
        ids.append(rid)
    assert ids[0] != ids[1]


def test_request_id_on_error_responses(idemgate):
    g = idemgate({"upstream": "http://127.0.0.1:%d" % free_port(),
                  "store": "memory"})
    r = request(g.port, "GET", "/x", {"X-Request-Id": "rid-err"})
    assert r.status == 502
    assert r.header("X-Request-Id") == "rid-err"


def test_hop_by_hop_request_headers_not_forwarded(idemgate, upstream):
    g = start(idemgate, upstream)
    hdrs = [("Connection", "X-Drop, keep-alive"), ("X-Drop", "1"),
            ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
            ("Trailer", "X-T"), ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Keep", "yes"), ("Authorization", "Bearer t1"),
            ("Accept", "application/json")]
    r = request(g.port, "GET", "/echo", hdrs)
    assert r.status == 200, r
    hs = echo_headers(r)
    names = {k.lower() for k, _ in hs}
    for dropped in ("x-drop", "keep-alive", "te", "trailer", "upgrade",
                    "proxy-authorization", "proxy-connection"):
        assert dropped not in names, (dropped, hs)
    for v in hvals(hs, "Connection"):
        assert "x-drop" not in v.lower(), hs
    assert hvals(hs, "X-Keep") == ["yes"]
    assert hvals(hs, "Authorization") == ["Bearer t1"]
    assert hvals(hs, "Accept") == ["application/json"]


def test_hop_by_hop_response_headers_not_forwarded(idemgate, upstream):
    g = start(idemgate, upstream)
    sets = ["Connection:X-Foo", "X-Foo:1", "Keep-Alive:timeout=5",
            "Proxy-Foo:bar", "Upgrade:h2c", "Trailer:X-T", "X-End:ok"]
    q = "&".join("set=" + s for s in sets)
    c = Client(g.port)
    r = c.request("GET", "/headers?" + q)
    assert r.status == 200, r
    names = {k.lower() for k, _ in r.headers}
    for dropped in ("x-foo", "keep-alive", "proxy-foo", "upgrade", "trailer"):
        assert dropped not in names, (dropped, r.headers)
    for v in r.header_all("Connection"):
        assert "x-foo" not in v.lower(), r.headers
    assert r.header("X-End") == "ok"
    # the client connection is still usable afterwards
    assert c.request("GET", "/echo").status == 200
    c.close()


# -- keep-alive --------------------------------------------------------------


def test_client_keepalive_100_requests(idemgate, upstream):
    g = start(idemgate, upstream)
    c = Client(g.port)
    for i in range(100):
        r = c.request("GET", "/echo?i=%d" % i)
        assert r.status == 200, (i, r)
        assert r.json()["path"] == "/echo?i=%d" % i
        assert not c.last_will_close, (i, r.headers)
    assert c.reconnects == 0
    c.close()


def test_client_keepalive_mixed_methods(idemgate, upstream):
    g = start(idemgate, upstream)
    c = Client(g.port)
    for i in range(20):
        if i % 2:
            r = c.request("POST", "/echo", body=b"x" * i)
            assert r.json()["body_len"] == i
        else:
            r = c.request("GET", "/big?bytes=%d" % (i * 100))
            assert len(r.body) == i * 100
    assert c.reconnects == 0
    c.close()


def test_upstream_connection_reuse(idemgate, upstream):
    g = start(idemgate, upstream)
    before = upstream.stats()["connections"]
    for i in range(50):
        r = request(g.port, "GET", "/echo?i=%d" % i)
        assert r.status == 200
    used = upstream.stats()["connections"] - before - 1  # minus our /__stats
    assert used <= 5, "50 requests used %d upstream connections" % used


# -- big bodies -------------------------------------------------------------------


FIVE_MB = 5 * 1024 * 1024


def test_5mb_request_body_intact(idemgate, upstream):
    g = start(idemgate, upstream)
    body = os.urandom(FIVE_MB)
    r = request(g.port, "POST", "/upload",
                {"Content-Type": "application/octet-stream"}, body, timeout=30)
    assert r.status == 200, r
    assert r.json() == {"len": FIVE_MB,
                        "sha256": hashlib.sha256(body).hexdigest()}


def test_5mb_response_body_intact(idemgate, upstream):
    g = start(idemgate, upstream)
    r = request(g.port, "GET", "/big?bytes=%d" % FIVE_MB, timeout=30)
    assert r.status == 200
    assert len(r.body) == FIVE_MB
    assert r.body == big_body(FIVE_MB)


def test_5mb_chunked_response_body_intact(idemgate, upstream):
    g = start(idemgate, upstream)
    r = request(g.port, "GET", "/bigchunked?bytes=%d" % FIVE_MB, timeout=30)
    assert r.status == 200
    assert len(r.body) == FIVE_MB
    assert r.body == big_body(FIVE_MB)


def test_chunked_request_body_forwarded(idemgate, upstream):
    g = start(idemgate, upstream)
    payload = os.urandom(70000)
    pieces = [payload[:1], payload[1:5000], payload[5000:65536],
              payload[65536:]]
    enc = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces)
    enc += b"0\r\n\r\n"
    r = request(g.port, "POST", "/upload",
                [("Transfer-Encoding", "chunked")], enc)
    assert r.status == 200, r
    assert r.json() == {"len": len(payload),
                        "sha256": hashlib.sha256(payload).hexdigest()}


def test_chunked_request_with_extension_and_trailer(idemgate, upstream):
    g = start(idemgate, upstream)
    data = (b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5;name=val\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    out = raw(g.port, data)
    rs = parse_responses(out)
    assert rs and rs[0].status == 200, out
    assert rs[0].json() == {"len": 11,
                            "sha256": hashlib.sha256(b"hello world").hexdigest()}


# -- limits -----------------------------------------------------------------------


def test_body_over_limit_gets_413(idemgate, upstream):
    g = start(idemgate, upstream, limits={"max_request_body_bytes": 1000})
    data = (b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 2000\r\n\r\n" + b"a" * 2000)
    out = raw(g.port, data)
    rs = parse_responses(out)
    assert rs, out
    assert_error(rs[0], 413, "payload_too_large")
    assert upstream.stats()["total"] == 0


def test_body_at_limit_passes(idemgate, upstream):
    g = start(idemgate, upstream, limits={"max_request_body_bytes": 1000})
    r = request(g.port, "POST", "/upload", body=b"a" * 1000)
    assert r.status == 200
    assert r.json()["len"] == 1000


def test_chunked_body_over_limit_gets_413(idemgate, upstream):
    g = start(idemgate, upstream, limits={"max_request_body_bytes": 1000})
    chunk = b"a" * 600
    data = (b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    out = raw(g.port, data)
    rs = parse_responses(out)
    assert rs, out
    assert_error(rs[0], 413, "payload_too_large")
    assert upstream.stats()["total"] == 0


def test_max_connections(idemgate, upstream):
    g = start(idemgate, upstream, limits={"max_connections": 2})
    held = []
    for _ in range(2):
        c = Client(g.port)
        assert c.request("GET", "/echo").status == 200
        held.append(c)
    served_before = upstream.stats()["total"]
    assert served_before == 2

    third = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    got = b""
    closed = False
    try:
        third.sendall(b"GET /echo?third=1 HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
    except OSError:
        closed = True
    if not closed:
        got, closed = recv_until_closed(third, 1.5)
    rs = parse_responses(got) if got.startswith(b"HTTP/") else []
    assert not any(r.status == 200 for r in rs), \
        "third connection served while two were held: %r" % got
    assert upstream.stats()["total"] == served_before

    for c in held:
        c.close()

    if not closed:
        # queued (or kept open without answer): it must be served now
        got += recv_until_closed(third, 10)[0]
        third.close()
        rs = parse_responses(got[got.find(b"HTTP/1.1 200"):]) \
            if b"HTTP/1.1 200" in got else []
        if rs:
            assert rs[0].json()["path"] == "/echo?third=1"
            return
    else:
        third.close()
    # refused/closed: a new connection is served once the others are gone
    deadline = time.monotonic() + 10
    last = None
    while time.monotonic() < deadline:
        try:
            last = request(g.port, "GET", "/echo?after=1", timeout=3)
            if last.status == 200:
                break
        except OSError as e:
            last = e
        time.sleep(0.1)
    assert isinstance(last, Resp) and last.status == 200, last


def test_client_timeout_partial_head(idemgate, upstream):
    g = start(idemgate, upstream, limits={"client_timeout_ms": 500})
    out, closed = raw_closed(g.port, b"GET /echo HTTP/1.1\r\nHo",
                                    timeout=10)
    assert closed, "connection with a stalled head was not closed"
    assert out == b"" or out.startswith(b"HTTP/1.1 408"), out
    assert upstream.stats()["total"] == 0


def test_client_timeout_partial_body(idemgate, upstream):
    g = start(idemgate, upstream, limits={"client_timeout_ms": 500})
    out, closed = raw_closed(
        g.port, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                b"\r\nonly-part", timeout=10)
    assert closed, "connection with a stalled body was not closed"
    assert out == b"" or out.startswith(b"HTTP/1.1 408"), out
    assert upstream.stats()["total"] == 0


def test_client_timeout_idle_keepalive(idemgate, upstream):
    g = start(idemgate, upstream, limits={"client_timeout_ms": 500})
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    try:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        got, closed = recv_until_closed(s, 10)
        assert got.startswith(b"HTTP/1.1 200"), got
        assert closed, "idle keep-alive connection never closed"
    finally:
        s.close()


def test_client_timeout_bounds_whole_head_not_each_read(idemgate, upstream):
    """A slowloris sending one byte every 100 ms never lets any single read
    wait 500 ms, yet must be cut off: the timeout covers the whole head."""
    g = start(idemgate, upstream, limits={"client_timeout_ms": 500})
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    head = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
    cut = False
    try:
        for i in range(len(head)):  # up to ~23 s, 46x the timeout
            try:
                s.sendall(head[i:i + 1])
            except OSError:
                cut = True
                break
            s.settimeout(0.1)
            try:
                chunk = s.recv(4096)
                if not chunk or chunk.startswith(b"HTTP/1.1 408"):
                    cut = True
                    break
            except socket.timeout:
                pass
            except OSError:
                cut = True
                break
    finally:
        s.close()
    assert cut, "slowloris head was never cut off"
    assert upstream.stats()["total"] == 0


# -- routes --------------------------------------------------------------------


def test_routes_longest_prefix_wins(idemgate, upstream, upstream2):
    g = idemgate({
        "upstream": upstream.url, "store": "memory",
        "routes": [
            {"prefix": "/v1/images", "upstream": upstream2.url},
            {"prefix": "/v1/images/hd", "upstream": upstream.url},
            {"prefix": "/v2", "upstream": upstream2.url},
        ]})
    cases = [("/v1/images/x", upstream2), ("/v1/images", upstream2),
             ("/v1/images?size=3", upstream2),
             ("/v1/images/hd/1", upstream), ("/v1/images/h", upstream2),
             ("/v1/other", upstream), ("/", upstream),
             ("/v2/anything", upstream2)]
    for path, want in cases:
        r = request(g.port, "GET", path)
        assert r.status == 200, (path, r)
        j = r.json()
        assert j["port"] == want.port, (path, j["port"], want.port)
        assert j["path"] == path


# -- SSE ------------------------------------------------------------------------


def test_sse_streamed_event_by_event(idemgate, upstream):
    g = start(idemgate, upstream)
    n, gap = 5, 300
    s = socket.create_connection(("127.0.0.1", g.port), timeout=15)
    arrivals = {}
    resp = None
    try:
        s.sendall(b"GET /sse?n=%d&gap_ms=%d HTTP/1.1\r\nHost: x\r\n"
                  b"Accept: text/event-stream\r\nConnection: close\r\n\r\n"
                  % (n, gap))
        buf = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(arrivals) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            now = time.monotonic()
            if resp is None:
                resp, rest = split_head(buf)
                if resp is None:
                    continue
            else:
                rest = buf[buf.find(b"\r\n\r\n") + 4:]
            if "chunked" in (resp.header("Transfer-Encoding") or "").lower():
                body = dechunk(rest)[0]
            else:
                body = rest
            for i in range(n):
                if i not in arrivals and b"data: %d\n\n" % i in body:
                    arrivals[i] = now
    finally:
        s.close()
    assert resp is not None and resp.status == 200
    assert (resp.header("Content-Type") or "").startswith("text/event-stream")
    assert sorted(arrivals) == list(range(n)), arrivals
    spread = arrivals[n - 1] - arrivals[0]
    assert spread >= 3 * gap * 0.8 / 1000.0, \
        "events were not streamed: first-to-last spread %.3f s" % spread


# -- upstream failures -------------------------------------------------------


def test_upstream_down_gives_502(idemgate):
    g = idemgate({"upstream": "http://127.0.0.1:%d" % free_port(),
                  "store": "memory"})
    r = request(g.port, "GET", "/echo")
    assert_error(r, 502, "upstream_unavailable")
    r = request(g.port, "POST", "/echo", body=b"x")
    assert_error(r, 502, "upstream_unavailable")


def test_upstream_timeout_gives_504(idemgate, upstream):
    g = start(idemgate, upstream, limits={"upstream_timeout_ms": 500})
    r = request(g.port, "GET", "/slow?ms=3000", timeout=20)
    assert_error(r, 504, "upstream_timeout")
    # the proxy is fine afterwards
    assert request(g.port, "GET", "/echo").status == 200


def test_upstream_drop_gives_502(idemgate, upstream):
    g = start(idemgate, upstream)
    r = request(g.port, "GET", "/drop")
    assert r.status == 502, r
    assert (r.header("Content-Type") or "").startswith("application/json")
    assert r.json()["error"]["type"] == "api_error"
    assert request(g.port, "GET", "/echo").status == 200


def test_upstream_restarted_pool_recovers(idemgate, upstream):
    """Pooled connections to an upstream that went away and came back are
    not reused blindly: after the restart, requests succeed again."""
    g = start(idemgate, upstream)
    for _ in range(3):
        assert request(g.port, "GET", "/echo").status == 200
    upstream.stop()
    r = request(g.port, "GET", "/echo")
    assert r.status == 502
    upstream.start()
    ok = 0
    for _ in range(5):
        if request(g.port, "GET", "/echo").status == 200:
            ok += 1
    assert ok >= 4, ok


# -- shutdown ------------------------------------------------------------------


def test_sigterm_lets_inflight_finish(idemgate, upstream):
    g = start(idemgate, upstream)
    result = {}

    def inflight():
        try:
            result["resp"] = request(g.port, "GET", "/slow?ms=2000",
                                     timeout=20)
        except Exception as e:  # noqa: BLE001 - reported below
            result["err"] = e

    t = threading.Thread(target=inflight, daemon=True)
    t.start()
    wait_until(lambda: upstream.stats()["by_path"].get("/slow"), 10)
    assert upstream.stats()["by_path"].get("/slow") == 1

    g.proc.send_signal(signal.SIGTERM)
    refused_while_alive = False
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and "resp" not in result:
        try:
            socket.create_connection(("127.0.0.1", g.port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            # reset: the connect raced the listener's close
            refused_while_alive = g.alive()
            break
        time.sleep(0.02)

    t.join(20)
    assert "err" not in result, result.get("err")
    assert result["resp"].status == 200, result["resp"]
    assert result["resp"].json()["slow"] is True
    try:
        code = g.proc.wait(timeout=15)
    except Exception:  # noqa: BLE001
        code = None
    assert code == 0, "exit code %r; stderr:\n%s" % (code, g.stderr())
    assert refused_while_alive, \
        "new connections were still accepted after SIGTERM"


def test_sigterm_closes_idle_keepalive_connections(idemgate, upstream):
    g = start(idemgate, upstream)
    c = Client(g.port)
    assert c.request("GET", "/echo").status == 200
    t0 = time.monotonic()
    code = g.stop(timeout=15)
    assert code == 0
    assert time.monotonic() - t0 < 10, "an idle client held up shutdown"
    c.close()


# -- logs ---------------------------------------------------------------------------


def test_access_log_json_lines(idemgate, upstream):
    g = start(idemgate, upstream)
    secret = "sk-secret-token-9f8e7d"
    r = request(g.port, "POST", "/echo?q=1",
                {"Authorization": "Bearer " + secret,
                 "X-API-Key": secret + "-api",
                 "X-Request-Id": "rid-log-1"},
                b'{"card": "BODYMARKER4242"}')
    assert r.status == 200
    lines = wait_until(lambda: [o for o in g.log_lines() if o.get("request_id") == "rid-log-1"],
                       5, 0.05)
    assert lines, g.stderr()
    line = lines[-1]
    for key in ("ts", "request_id", "method", "path", "status", "outcome",
                "duration_ms", "upstream_ms"):
        assert key in line, (key, line)
    assert line["method"] == "POST"
    assert line["path"].startswith("/echo")
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], (int, float))
    assert isinstance(line["upstream_ms"], (int, float))
    g.stop()
    text = g.stderr()
    assert secret not in text
    assert "BODYMARKER4242" not in text
    for ln in text.splitlines():
        if ln.strip():
            json.loads(ln)  # every stderr line is one JSON object


def test_access_log_for_error_response(idemgate):
    g = idemgate({"upstream": "http://127.0.0.1:%d" % free_port(),
                  "store": "memory"})
    r = request(g.port, "GET", "/nowhere", {"X-Request-Id": "rid-log-502"})
    assert r.status == 502
    lines = wait_until(lambda: [o for o in g.log_lines() if o.get("request_id") == "rid-log-502"],
                       5, 0.05)
    assert lines, g.stderr()
    assert lines[-1]["status"] == 502


# -- workers ---------------------------------------------------------------------


def test_two_workers(idemgate, upstream):
    g = idemgate({"upstream": upstream.url, "store": "memory", "workers": 2})
    errors = []

    def worker(n):
        try:
            for i in range(10):
                r = request(g.port, "GET", "/echo?w=%d&i=%d" % (n, i))
                if r.status != 200:
                    errors.append(r)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    in_threads(worker, 4, 120, "clients")
    assert not errors, errors
    assert upstream.stats()["total"] == 40
    assert g.stop() == 0


# -- Expect: 100-continue ---------------------------------------------------------


def test_expect_100_continue(idemgate, upstream):
    """A client that sends Expect: 100-continue and waits gets a 100 (from
    idemgate or relayed from the upstream), then its body is forwarded."""
    g = start(idemgate, upstream)
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    try:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        got = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in got and time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
        assert got.startswith(b"HTTP/1.1 100"), got
        s.sendall(b"hello")
        rest = got[got.find(b"\r\n\r\n") + 4:]
        rest += recv_to_close(s, timeout=10)
    finally:
        s.close()
    rs = parse_responses(rest)
    assert rs and rs[0].status == 200, rest
    assert rs[0].json() == {"len": 5,
                            "sha256": hashlib.sha256(b"hello").hexdigest()}


# -- IPv6 ---------------------------------------------------------------------------


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no ::1")
def test_listen_ipv6(idemgate, upstream):
    port = free_port()
    g = idemgate({"upstream": upstream.url, "store": "memory",
                  "listen": "[::1]:%d" % port}, wait=False)
    assert wait_port(port, 10, g.proc, host="::1"), g.stderr()
    r = request(port, "GET", "/echo", host="::1")
    assert r.status == 200
    hs = echo_headers(r)
    assert hvals(hs, "X-Forwarded-For") == ["::1"], hs
