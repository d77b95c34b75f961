"""HTTP/2 from clients: the `http2` settings ({"enabled", "max_concurrent_streams",
"initial_window_bytes", "max_resets_per_second"}, enabled by default), h2c with
prior knowledge on the plain listener and ALPN h2 on the TLS listener;
upstreams stay HTTP/1.1.

What a test checks:

- negotiation: `-t` accepts the keys and `-T` shows their defaults; the
  server's SETTINGS advertise max_concurrent_streams and
  initial_window_bytes; ALPN offers h2 and http/1.1; with enabled: false,
  ALPN offers http/1.1 only and a preface on the plain listener is answered
  as before the feature (HTTP/1.1 505 bad_request, then close);
- every HTTP/1.1 behaviour, per stream: first request executes, a retry
  replays (a key used over HTTP/1.1 replays over HTTP/2 and back),
  409/422 idempotency_key_reuse, 409 request_in_progress, 400s, 413
  payload_too_large with the JSON bodies of HTTP/1.1, GET passes through,
  x-request-id on every answer, :authority is the Host the upstream sees,
  normalized targets, SSE events delivered as produced, one access line
  per stream with the fields of HTTP/1.1, idemgate_requests_total counts
  streams;
- concurrency: one key on N streams of one connection, or on two
  connections (memory and Redis stores): one execution; a stream reset
  (CANCEL) after its request was sent is a client that left: the answer
  is kept and replayed;
- limits: streams past max_concurrent_streams are refused (REFUSED_STREAM
  or PROTOCOL_ERROR) and never forwarded; a header block over
  max_header_bytes in HEADERS + CONTINUATION is 431 or reset; CONTINUATION
  floods, rapid reset (CVE-2023-44487), PING / SETTINGS / empty DATA
  floods end with GOAWAY (ENHANCE_YOUR_CALM where the contract says so) and
  a closed connection, the process healthy, exchanges already started
  kept; flow control (a stream whose window the client keeps closed does
  not hold up the others; a body larger than the window goes up);
  HPACK with a huge client table size and many large headers; idle
  connections closed after client_timeout_ms; SIGTERM: GOAWAY, the open
  stream completes, exit 0;
- curl end to end: --http2-prior-knowledge and --http2 over TLS.

Tests that are cheap on both run on both transports (the `transport`
parameter: "h2c", "tls"). Every wait is bounded; nothing asserts a time.
The client is idemtest.h2 (python3-h2 with frame-level control): a server
that does not speak HTTP/2 fails with "no HTTP/2 preface answer" (h2c) or
"TLS ALPN chose 'http/1.1', not h2".
"""

import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time

import pytest

from idemtest.assertions import (DEFAULT_REPLAY_EXCLUDE, after_release, assert_error,
                                 assert_in_progress, assert_one_fresh, e2e_headers,
                                 error_code,
                                 wait_until, wait_upstream_saw)
from idemtest.certs import make_certs
from idemtest.config import merge, store_config
from idemtest.h2 import (CANCEL, CONTINUATION, DATA, ENHANCE_YOUR_CALM, HEADERS,
                         PING, PREFACE, PROTOCOL_ERROR, REFUSED_STREAM, SETTINGS,
                         H2Client, SettingCodes, alpn_selected, frame,
                         h2_post, h2_request, hpack_literal)
from idemtest.http import BODY, hdrs, metrics, parse_responses, raw_closed
from idemtest.http import request as http1_request
from idemtest.procs import free_port, run_idemgate, wait_port

TRANSPORTS = ["h2c", "tls"]
HTTP2_DEFAULTS = {"enabled": True, "max_concurrent_streams": 100,
                  "initial_window_bytes": 65535, "max_resets_per_second": 100}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
              "upgrade", "te"}
MIB = 1024 * 1024


def big_body(n):
    """What upstream.py's /big?bytes=n answers."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


# -- starting -----------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("h2tls")))


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def gate(idemgate, upstream, certs):
    """start(transport="h2c", http2=None, store=None, admin=False, **top):
    idemgate in front of the test's upstream (memory store unless store, a
    config.store_config() dict, says otherwise), with http2 as the `http2`
    block when given (else none: the defaults), the test certificate as
    `tls` for transport "tls", an admin listener (.admin) with admin, and
    top merged last. The instance gets .tls and .ca for the clients."""
    def start(transport="h2c", http2=None, store=None, admin=False, **top):
        cfg = merge({"upstream": upstream.url}, store or {"store": "memory"})
        if http2 is not None:
            cfg["http2"] = http2
        if transport == "tls":
            cfg["tls"] = {"cert_file": certs.cert, "key_file": certs.key}
        if admin:
            cfg["admin"] = {"listen": "127.0.0.1:%d" % free_port()}
        cfg = merge(cfg, top)
        g = idemgate(cfg)
        g.tls = transport == "tls"
        g.ca = certs.ca
        if admin:
            g.admin = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
            assert wait_port(g.admin, proc=g.proc), g.stderr()
        return g
    return start


def connect(g, **kw):
    """An H2Client to g on its transport."""
    return H2Client(g.port, tls=g.tls, ca=g.ca, **kw)


def h2(g, method, path, headers=None, body=b"", **kw):
    return h2_request(g.port, method, path, headers, body, tls=g.tls, ca=g.ca, **kw)


def h2post(g, path, key, body=BODY, **kw):
    return h2_post(g.port, path, key, body, tls=g.tls, ca=g.ca, **kw)


def h1(g, method, path, headers=None, body=b""):
    """The same request over HTTP/1.1 on g's listener (TLS offering
    http/1.1 only when g is TLS)."""
    ctx = None
    if g.tls:
        ctx = ssl.create_default_context(cafile=g.ca)
        ctx.set_alpn_protocols(["http/1.1"])
    return http1_request(g.port, method, path, headers, body, context=ctx)


def h1post(g, path, key, body=BODY, extra=None):
    return h1(g, "POST", path, hdrs(key, extra=extra), body)


def log_tail(g, n=15):
    return "\n".join(g.stderr().splitlines()[-n:])


def assert_healthy(g):
    """The process runs, and a new connection is served."""
    assert g.alive(), "idemgate is gone (exit %r); its log ends:\n%s" % (
        g.proc.poll(), log_tail(g))
    r = h2(g, "GET", "/echo?healthy=1")
    assert r.status == 200, r


def assert_h2_answer(r):
    """What every HTTP/2 answer from idemgate holds: lowercase header names,
    no connection-specific header (RFC 9113 section 8.2.2), an
    x-request-id."""
    for k, _ in r.headers:
        assert k == k.lower(), ("header name not lowercase", k, r)
        assert k not in HOP_BY_HOP, ("connection-specific header", k, r)
    assert r.header("x-request-id"), ("no x-request-id", r)


# content-length is optional in HTTP/2 (DATA frames carry the length), and
# an HTTP/2 answer has no reason phrase: a replay is compared without them,
# also across protocols
REPLAY_EXCLUDE = set(DEFAULT_REPLAY_EXCLUDE) | {"content-length"}


def assert_replay(replay, first):
    """replay (HTTP/1.1 or HTTP/2) repeats first (either): status, body,
    end-to-end headers in order (assertions.e2e_headers, content-length
    aside), one idempotent-replayed: true."""
    assert first.header("Idempotent-Replayed") is None, first
    assert replay.header_all("Idempotent-Replayed") == ["true"], replay
    assert replay.status == first.status, (first, replay)
    assert replay.body == first.body, (first, replay)
    assert e2e_headers(replay, REPLAY_EXCLUDE) == e2e_headers(first, REPLAY_EXCLUDE), (
        first.headers, replay.headers)


def echo_headers(r, name):
    return [v for k, v in r.json()["headers"] if k.lower() == name.lower()]


# -- configuration and negotiation ----------------------------------------------


def test_config_keys_accepted_and_defaults_dumped(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"store": "memory", "http2": HTTP2_DEFAULTS}))
    res = run_idemgate(["-t", "-c", str(path)])
    assert res.returncode == 0 and "configuration ok" in res.stdout, (
        res.returncode, res.stdout, res.stderr)
    path.write_text(json.dumps({"store": "memory"}))
    res = run_idemgate(["-T", "-c", str(path)])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout).get("http2") == HTTP2_DEFAULTS, res.stdout


def test_server_settings_defaults(gate, transport):
    g = gate(transport)
    with connect(g) as c:
        st = c.server_settings
        assert st.get(SettingCodes.MAX_CONCURRENT_STREAMS) == 100, st
        assert st.get(SettingCodes.INITIAL_WINDOW_SIZE, 65535) == 65535, st
        if g.tls:
            assert c.alpn == "h2"
        r = c.response(c.request("GET", "/echo"))
        assert r.status == 200, r
        assert_h2_answer(r)
        assert c.settings_acks >= 1, "the server never acknowledged our SETTINGS"


def test_server_settings_configured(gate):
    g = gate(http2={"max_concurrent_streams": 7, "initial_window_bytes": 131072})
    with connect(g) as c:
        st = c.server_settings
        assert st.get(SettingCodes.MAX_CONCURRENT_STREAMS) == 7, st
        assert st.get(SettingCodes.INITIAL_WINDOW_SIZE) == 131072, st


def test_alpn_offers_h2_and_http11(gate):
    g = gate("tls")
    assert alpn_selected(g.port, g.ca, ("h2", "http/1.1")) == "h2"
    assert alpn_selected(g.port, g.ca, ("http/1.1", "h2")) == "h2"
    assert alpn_selected(g.port, g.ca, ("http/1.1",)) == "http/1.1"
    # and HTTP/1.1 over TLS still works
    r = h1(g, "GET", "/echo")
    assert r.status == 200, r
    assert echo_headers(r, "X-Forwarded-Proto") == ["https"], r


def test_disabled_plain_preface_answered_as_http1(gate):
    """With enabled: false a preface is what it was before HTTP/2: a
    request line with version HTTP/2.0, answered 505 bad_request,
    Connection: close, and the connection closed."""
    g = gate(http2={"enabled": False})
    out, closed = raw_closed(g.port, PREFACE + frame(SETTINGS, 0, 0), timeout=5)
    rs = parse_responses(out)
    assert len(rs) == 1 and out.startswith(b"HTTP/1.1 505 "), out[:300]
    assert_error(rs[0], 505, "bad_request")
    assert (rs[0].header("Connection") or "").lower() == "close", rs[0]
    assert rs[0].header("X-Request-Id"), rs[0]
    assert closed, "connection left open after the 505"
    assert h1(g, "GET", "/echo").status == 200


def test_disabled_tls_alpn_offers_only_http11(gate):
    g = gate("tls", http2={"enabled": False})
    assert alpn_selected(g.port, g.ca, ("h2", "http/1.1")) == "http/1.1"
    try:
        got = alpn_selected(g.port, g.ca, ("h2",))
    except ssl.SSLError:
        got = None  # refusing the handshake (no_application_protocol) is fine
    assert got != "h2", got
    assert h1(g, "GET", "/echo").status == 200


# -- idempotency per stream ------------------------------------------------------


def test_post_executes_then_replays(gate, upstream, transport):
    g = gate(transport)
    with connect(g) as c:
        r1 = c.response(c.post("/count", "h2-first"))
        assert r1.status == 201, r1
        assert not r1.replayed, r1
        assert r1.json() == {"n": 1, "key": "h2-first"}
        assert_h2_answer(r1)
        # a retry on a new stream of the same connection
        r2 = after_release(lambda: c.response(c.post("/count", "h2-first")))
        assert_replay(r2, r1)
        assert_h2_answer(r2)
        assert r2.header("x-request-id") != r1.header("x-request-id")
    # and on a new connection
    r3 = h2post(g, "/count", "h2-first")
    assert_replay(r3, r1)
    assert upstream.count("h2-first") == 1


def test_keys_shared_between_http1_and_http2(gate, upstream):
    g = gate()
    a1 = h1post(g, "/count", "mixed-a")
    assert a1.status == 201, a1
    a2 = after_release(lambda: h2post(g, "/count", "mixed-a"))
    assert_replay(a2, a1)
    b1 = h2post(g, "/count", "mixed-b")
    assert b1.status == 201 and not b1.replayed, b1
    b2 = after_release(lambda: h1post(g, "/count", "mixed-b"))
    assert_replay(b2, b1)
    assert upstream.count("mixed-a") == 1 and upstream.count("mixed-b") == 1


def test_in_progress_and_reuse_errors_as_http1(gate, upstream, transport):
    """While the first stream's request runs: the same request on another
    stream is 409 request_in_progress, another body 409
    idempotency_key_reuse; the answers are those of HTTP/1.1."""
    g = gate(transport)
    with connect(g) as c:
        first = c.post("/count?ms=1500", "h2-busy")
        wait_upstream_saw(upstream, "h2-busy")
        busy = c.response(c.post("/count?ms=1500", "h2-busy"))
        other = c.response(c.post("/count?ms=1500", "h2-busy", body=b'{"amount": 999}'))
        busy1 = h1post(g, "/count?ms=1500", "h2-busy")
        other1 = h1post(g, "/count?ms=1500", "h2-busy", body=b'{"amount": 999}')
        assert_in_progress(busy)
        assert_error(other, 409, "idempotency_key_reuse")
        for r2, r1 in ((busy, busy1), (other, other1)):
            assert_h2_answer(r2)
            assert r2.status == r1.status, (r2, r1)
            assert r2.json() == r1.json(), (r2, r1)
            assert r2.header("content-type") == r1.header("Content-Type"), (r2, r1)
            assert r2.header("retry-after") == r1.header("Retry-After"), (r2, r1)
        r = c.response(first, timeout=15)
        assert r.status == 201 and not r.replayed, r
    assert upstream.count("h2-busy") == 1


def test_reuse_after_completion_with_mismatch_status_422(gate, upstream):
    g = gate(idempotency={"mismatch_status": 422})
    r1 = h2post(g, "/count", "h2-422")
    assert r1.status == 201, r1
    r = after_release(lambda: h2post(g, "/count", "h2-422", body=b'{"amount": 1}'))
    assert_error(r, 422, "idempotency_key_reuse")
    assert_h2_answer(r)
    assert r.json() == h1post(g, "/count", "h2-422", body=b'{"amount": 1}').json()
    assert_replay(h2post(g, "/count", "h2-422"), r1)
    assert upstream.count("h2-422") == 1


def test_error_bodies_as_http1(gate, upstream):
    """400s of the idempotency checks, over both protocols: same status,
    same JSON body, same content type; nothing forwarded."""
    g = gate(routes=[{"prefix": "/req", "idempotency": {"required": True}}])
    cases = [("POST", "/req/x", hdrs(None), "idempotency_key_required"),
             ("POST", "/count", hdrs("k" * 256), "invalid_idempotency_key"),
             ("POST", "/count", hdrs('"unterminated'), "invalid_idempotency_key")]
    with connect(g) as c:
        for method, path, headers, code in cases:
            r2 = c.response(c.request(method, path, headers, BODY))
            r1 = h1(g, method, path, headers, BODY)
            assert_error(r2, 400, code)
            assert_h2_answer(r2)
            assert r2.json() == r1.json(), (r2, r1)
            assert r2.header("content-type") == r1.header("Content-Type"), (r2, r1)
    assert upstream.stats()["total"] == 0


def test_x_request_id_on_every_answer(gate, upstream):
    g = gate(routes=[{"prefix": "/req", "idempotency": {"required": True}}])
    with connect(g) as c:
        answers = [
            c.response(c.post("/count", "rid-1")),                       # executed
            after_release(lambda: c.response(c.post("/count", "rid-1"))),  # replayed
            c.response(c.request("GET", "/status/404")),                 # upstream's 404
            c.response(c.request("POST", "/req/x", hdrs(None), BODY)),   # our 400
        ]
        ids = [r.header("x-request-id") for r in answers]
        assert all(ids), answers
        assert len(set(ids)) == len(ids), ids
        assert [r.status for r in answers] == [201, 201, 404, 400], answers
        mine = c.response(c.request("GET", "/echo", [("x-request-id", "h2-rid-77")]))
        assert mine.header("x-request-id") == "h2-rid-77", mine
        assert echo_headers(mine, "X-Request-Id") == ["h2-rid-77"], mine.json()


def test_get_is_passthrough(gate, upstream, transport):
    g = gate(transport)
    with connect(g) as c:
        for n in (1, 2):
            r = c.response(c.request("GET", "/count", hdrs("h2-get")))
            assert r.status == 201 and not r.replayed, r
            assert r.json()["n"] == n, r
    assert upstream.count("h2-get") == 2


def test_authority_is_the_host_upstream_sees(gate, transport):
    g = gate(transport)
    with connect(g, authority="api.example.test:8443") as c:
        r = c.response(c.request("GET", "/echo?q=1", [("x-client", "h2")]))
        assert r.status == 200, r
        doc = r.json()
        assert doc["path"] == "/echo?q=1", doc
        assert echo_headers(r, "Host") == ["api.example.test:8443"], doc["headers"]
        assert echo_headers(r, "X-Client") == ["h2"], doc["headers"]
        assert echo_headers(r, "X-Forwarded-Proto") == ["https" if g.tls else "http"], doc
        assert not [k for k, _ in doc["headers"] if k.startswith(":")], doc["headers"]
        # a body with content-length, and one without (HTTP/2 needs none):
        # both arrive whole
        for cl in (True, False):
            body = b"x" * 5000
            r = c.response(c.request("POST", "/echo", [("content-type", "text/plain")],
                                     body, content_length=cl))
            assert r.status == 200, r
            assert r.json()["body_len"] == 5000 and r.json()["body"] == "x" * 5000, (cl, r)


def test_normalized_targets(gate, upstream):
    g = gate(routes=[{"prefix": "/req", "idempotency": {"required": True}}])
    with connect(g) as c:
        r = c.response(c.request("GET", "/a//b/./c/../%64?q=%2e%2e//"))
        assert r.status == 200 and r.json()["path"] == "/a/b/d?q=%2e%2e//", r
        before = upstream.stats()["total"]
        for path in ("/%72eq", "//req", "/x/../req"):
            r = c.response(c.request("POST", path, hdrs(None), BODY))
            assert r.status == 400, (path, r)
            assert error_code(r.body) in ("idempotency_key_required", "bad_request"), (path, r)
        # above the root: 400 bad_request, or the stream refused as malformed
        st = c.wait_stream(c.request("GET", "/../etc"))
        if st.reset_code is None:
            assert_error(st.resp(), 400, "bad_request")
        else:
            assert st.reset_code == PROTOCOL_ERROR, st
        assert upstream.stats()["total"] == before


@pytest.mark.parametrize("content_length", [True, False], ids=["cl", "no_cl"])
def test_body_over_limit_is_413(gate, upstream, transport, content_length):
    g = gate(transport, limits={"max_request_body_bytes": 1000})
    with connect(g) as c:
        sid = c.request("POST", "/count", hdrs("h2-big"), b"x" * 4000,
                        content_length=content_length)
        st = c.wait_stream(sid)
        # the answer may be followed by a reset of the rest of the body
        assert st.status == 413, c.describe()
        r = st.resp()
        assert_error(r, 413, "payload_too_large")
        assert_h2_answer(r)
        assert r.json() == h1post(g, "/count", "h1-big", body=b"x" * 1001).json()
    assert upstream.stats()["total"] == 0
    r = h2post(g, "/count", "h2-big", body=b"x" * 1000)
    assert r.status == 201 and not r.replayed, r


def test_sse_events_arrive_as_produced(gate, upstream, transport):
    """The first event is read while the upstream still has two to send
    (0.7 s apart): the stream has neither ended nor carried the second
    event yet. An event stream is not kept: a retry runs again."""
    g = gate(transport)
    path = "/sse?n=3&gap_ms=700"
    with connect(g) as c:
        sid = c.post(path, "h2-sse")
        st = c.streams[sid]
        assert c.wait(lambda: b"data: 0\n\n" in st.body or st.done, 10), c.describe()
        assert st.status == 200, st
        assert (st.header("content-type") or "").startswith("text/event-stream"), st
        assert b"data: 1" not in st.body and not st.done, (
            "the first event came with the rest of the stream: %r" % st.chunks)
        r = c.response(sid, timeout=15)
        assert r.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n", r
        r2 = after_release(lambda: c.response(c.post(path, "h2-sse"), timeout=15))
        assert r2.status == 200 and not r2.replayed, r2
    assert upstream.count("h2-sse") == 2


def test_access_lines_one_per_stream(gate, upstream):
    """Three exchanges over HTTP/1.1, the same three over HTTP/2 streams
    of one connection: one access line each (found by request_id, the
    answer's x-request-id), with the same fields for the same kind of
    exchange."""
    g = gate()
    h1_answers = [h1post(g, "/count", "al-1")]
    h1_answers.append(after_release(lambda: h1post(g, "/count", "al-1")))
    h1_answers.append(h1(g, "GET", "/echo"))
    with connect(g) as c:
        h2_answers = [c.response(c.post("/count", "al-2"))]
        h2_answers.append(after_release(lambda: c.response(c.post("/count", "al-2"))))
        h2_answers.append(c.response(c.request("GET", "/echo")))
    answers = h1_answers + h2_answers
    ids = [r.header("X-Request-Id") for r in answers]
    assert all(ids) and len(set(ids)) == 6, answers

    def lines_by_id():
        out = {}
        for ln in g.access_lines():
            out.setdefault(ln.get("request_id"), []).append(ln)
        return out

    assert wait_until(lambda: all(i in lines_by_id() for i in ids)), (ids, g.access_lines())
    by_id = lines_by_id()
    assert len(g.access_lines()) == 6, g.access_lines()
    for outcome, r1, r2 in zip(("executed", "replayed", "passthrough"), h1_answers,
                               h2_answers):
        [line1], [line2] = by_id[r1.header("X-Request-Id")], by_id[r2.header("X-Request-Id")]
        assert line1["outcome"] == outcome, line1
        assert set(line2) == set(line1), (line1, line2)
        assert line2["outcome"] == outcome, line2
        assert line2["status"] == r2.status, (line2, r2)
        assert line2["method"] == line1["method"] and line2["path"] == line1["path"], (
            line1, line2)


def test_requests_total_counts_streams(gate, upstream):
    g = gate(admin=True)

    def counts():
        m = metrics(g.admin)
        return {o: m.get('idemgate_requests_total{outcome="%s"}' % o, 0)
                for o in ("executed", "replayed", "passthrough")}

    before = counts()
    with connect(g) as c:
        assert c.response(c.post("/count", "m-1")).status == 201
        assert c.response(c.post("/count", "m-2")).status == 201
        r = after_release(lambda: c.response(c.post("/count", "m-1")))
        assert r.replayed, r
        assert c.response(c.request("GET", "/echo")).status == 200
    want = dict(before, executed=before["executed"] + 2, replayed=before["replayed"] + 1,
                passthrough=before["passthrough"] + 1)
    assert wait_until(lambda: counts() == want), (counts(), want)


# -- concurrency ----------------------------------------------------------------


def assert_one_execution(answers, key, upstream):
    """Of answers to one key and body sent at once: exactly one executed
    (201, not replayed), every other one is 409 request_in_progress or a
    replay of it; the upstream ran it once."""
    fresh = assert_one_fresh(answers, 201, assert_replay)
    assert upstream.count(key) == 1, upstream.stats()
    return fresh


def test_one_key_on_many_streams_executes_once(gate, upstream, transport):
    g = gate(transport)
    with connect(g) as c:
        sids = [c.post("/count?ms=500", "h2-same", flush=False) for _ in range(8)]
        c.flush()  # every stream's frames in one write
        answers = [c.response(s, timeout=15) for s in sids]
        first = assert_one_execution(answers, "h2-same", upstream)
        again = after_release(lambda: c.response(c.post("/count?ms=500", "h2-same")))
        assert_replay(again, first)


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
def test_one_key_on_two_connections_executes_once(request, gate, upstream, store_kind):
    redis = request.getfixturevalue("redis") if store_kind == "redis" else None
    store = store_config(store_kind, redis)
    g = gate(store=store)
    with connect(g) as a, connect(g) as b:
        sids = [(c, c.post("/count?ms=500", "h2-two", flush=False))
                for c in (a, b) for _ in range(4)]
        a.flush()
        b.flush()
        answers = [c.response(s, timeout=15) for c, s in sids]
    assert_one_execution(answers, "h2-two", upstream)


@pytest.mark.parametrize("when", ["at_once", "while_upstream_works"])
def test_reset_stream_keeps_the_answer(gate, upstream, transport, when):
    """RST_STREAM CANCEL after the request was sent: the exchange goes on,
    the upstream runs it once, and a retry on a new stream gets the
    replay."""
    g = gate(transport)
    key = "h2-cancel-" + when
    with connect(g) as c:
        sid = c.post("/count?ms=800", key)
        if when == "while_upstream_works":
            wait_upstream_saw(upstream, key)
        c.reset(sid, CANCEL)
        wait_upstream_saw(upstream, key)
        r = after_release(lambda: c.response(c.post("/count?ms=800", key)),
                          timeout=10.0, interval=0.1, must=True)
        assert r.status == 201 and r.replayed, r
        assert r.json() == {"n": 1, "key": key}, r
        assert_h2_answer(r)
    assert upstream.count(key) == 1


# -- limits ---------------------------------------------------------------------


def test_streams_past_max_concurrent_streams_are_refused(gate, upstream):
    g = gate(http2={"max_concurrent_streams": 4})
    with connect(g) as c:
        assert c.server_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS) == 4, (
            c.server_settings)
        held = [c.post("/count?ms=1500", "mcs-%d" % i, flush=False) for i in range(4)]
        extra = []
        for i in range(3):
            sid = c.next_stream_id()
            c.send_headers(sid, c.request_headers("POST", "/count", hdrs("mcs-x%d" % i)
                                                  + [("content-length", "0")]),
                           end_stream=True, ignore_limit=True, flush=False)
            extra.append(sid)
        c.flush()
        for sid in extra:
            st = c.wait_stream(sid)
            assert st.reset_code in (REFUSED_STREAM, PROTOCOL_ERROR), (
                "stream %d past the limit: %r" % (sid, st))
        assert not c.goaways, "streams past the limit cost the connection: " + c.describe()
        for sid in held:
            assert c.response(sid, timeout=15).status == 201
        # the connection is still usable
        r = c.response(c.post("/count", "mcs-after"))
        assert r.status == 201, r
        assert not c.goaways, c.goaways
    for i in range(3):
        assert upstream.count("mcs-x%d" % i) == 0, upstream.stats()


def test_oversized_header_block_in_continuation_frames(gate, upstream, transport):
    """12 KB of headers (max_header_bytes 4096), sent as HEADERS + 1 KB
    CONTINUATION frames: the stream gets 431 with the code HTTP/1.1 gives,
    or is reset; nothing reaches the upstream."""
    g = gate(transport, limits={"max_header_bytes": 4096})
    pad = [("x-pad-%02d" % i, "p" * 1000) for i in range(12)]
    with connect(g) as c:
        sid = c.request("POST", "/count", hdrs("h2-431") + pad, fragment=1024)
        assert c.wait(lambda: c.streams[sid].done or c.goaways, 10), c.describe()
        st = c.streams[sid]
        assert st.done, "no answer and no reset for the stream, only %s" % c.describe()
        if st.status is not None:
            r = st.resp()
            assert r.status == 431, r
            # what HTTP/1.1 answers to a head over the limit on this listener
            r1 = h1(g, "GET", "/echo", [("X-Big", "a" * 5000)])
            assert r1.status == 431, r1
            assert_error(r, 431, error_code(r1.body))
            assert r.json() == r1.json(), (r, r1)
            assert r.header("x-request-id"), r
    assert upstream.stats()["total"] == 0, upstream.stats()
    assert_healthy(g)


def continuation_flood(c, kind):
    """A HEADERS without END_HEADERS, then CONTINUATION frames that never
    end the block: "big" 2 MB of one header value in 1000-byte frames,
    "empty" 10000 empty frames, "tiny" 10000 frames of one byte each
    (10 KB in all, under max_header_bytes: only the count is abusive).
    Valid HPACK throughout (literals without indexing)."""
    sid = c.next_stream_id()
    start = b"".join(hpack_literal(k, v) for k, v in (
        (":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/echo")))
    if kind == "big":
        block = start + hpack_literal("x-flood", "a" * 2000000)
        first, rest, size = block[:1000], block[1000:], 1000
    elif kind == "tiny":
        block = start + hpack_literal("x-flood", "a" * 10000)
        first, rest, size = block[:len(start) + 8], block[len(start) + 8:], 1
    else:
        first, rest, size = start, b"", 0
    c.send_raw(frame(HEADERS, 0x1, sid, first))  # END_STREAM, no END_HEADERS
    if size:
        frames = [frame(CONTINUATION, 0, sid, rest[i:i + size])
                  for i in range(0, len(rest), size)]
    else:
        frames = [frame(CONTINUATION, 0, sid, b"")] * 10000
    c.send_raw(b"".join(frames), deadline=time.monotonic() + 10, read_between=True)


@pytest.mark.parametrize("kind", ["big", "empty", "tiny"])
def test_continuation_flood_goaway(gate, upstream, kind):
    g = gate()
    with connect(g) as c:
        continuation_flood(c, kind)
        assert c.wait_closed(10), "connection still open after the flood: " + c.describe()
        assert c.goaways, "closed without a GOAWAY: " + c.describe()
    assert upstream.stats()["total"] == 0, upstream.stats()
    assert_healthy(g)


def settled_by_key(upstream, timeout=5.0):
    """upstream's executions by key once two readings 0.3 s apart agree
    (the exchanges still on their way have arrived), or at the deadline."""
    last = upstream.stats()["by_key"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = upstream.stats()["by_key"]
        if now == last:
            break
        last = now
    return last


def test_rapid_reset_goaway_enhance_your_calm(gate, upstream):
    """200 streams opened and reset at once (max_resets_per_second 20):
    GOAWAY ENHANCE_YOUR_CALM, connection closed. Every key whose request
    reached the upstream is kept: a retry from a new connection replays it
    (after 409s while it runs); no key ever runs twice."""
    g = gate(http2={"max_resets_per_second": 20})
    keys = ["rr-%03d" % i for i in range(200)]
    with connect(g) as c:
        for k in keys:
            c.reset(c.post("/count?ms=100", k, flush=False), CANCEL, flush=False)
        c.flush()
        assert c.wait_closed(10), "connection still open: " + c.describe()
        codes = [ga.error_code for ga in c.goaways]
        assert ENHANCE_YOUR_CALM in codes, c.describe()
    assert_healthy(g)
    by_key = settled_by_key(upstream)
    seen = [k for k in keys if by_key.get(k)]
    with connect(g) as c:
        for k in seen:
            r = after_release(lambda: c.response(c.post("/count?ms=100", k)),
                              timeout=10.0, interval=0.1, must=True)
            assert r.status == 201 and r.replayed, (k, r)
            assert r.json() == {"n": 1, "key": k}, (k, r)
        for k in [k for k in keys if k not in seen][:10]:
            r = c.response(c.post("/count?ms=100", k))
            assert r.status in (201, 409), (k, r)
    by_key = upstream.stats()["by_key"]
    twice = {k: n for k, n in by_key.items() if k.startswith("rr-") and n > 1}
    assert not twice, "keys that ran twice: %r" % twice


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_frame_flood_closes_the_connection(gate, kind):
    """20000 PINGs (or empty SETTINGS) without reading a single ACK (a
    4 KB receive buffer: the server's answers back up): any GOAWAY, and
    the connection closed."""
    g = gate()
    one = frame(PING, 0, 0, b"flooding") if kind == "ping" else frame(SETTINGS, 0, 0)
    with connect(g, rcvbuf=4096) as c:
        c.send_raw(one * 20000, deadline=time.monotonic() + 10)
        assert c.wait_closed(15), "connection still open after the flood: " + c.describe()
    assert_healthy(g)


def test_empty_data_frame_flood_goaway(gate, upstream):
    g = gate()
    with connect(g) as c:
        sid = c.request("POST", "/echo", [("content-type", "text/plain")], b"",
                        end_stream=False, content_length=False)
        c.send_raw(frame(DATA, 0, sid, b"") * 20000, deadline=time.monotonic() + 10,
                   read_between=True)
        assert c.wait_closed(10), "connection still open after the flood: " + c.describe()
        assert ENHANCE_YOUR_CALM in [ga.error_code for ga in c.goaways], c.describe()
    assert_healthy(g)


def test_stalled_stream_does_not_hold_up_others(gate, transport):
    """Stream A (1 MiB) gets no window from the client beyond the initial
    65535 bytes; stream B on the same connection still gets its whole
    answer; once A's window is opened A completes intact."""
    g = gate(transport)
    with connect(g) as c:
        a = c.request("GET", "/big?bytes=%d" % MIB)
        c.hold_window(a)
        b = c.request("GET", "/big?bytes=200000")
        rb = c.response(b, timeout=15)
        assert rb.status == 200 and rb.body == big_body(200000), rb
        rc = c.response(c.post("/count", "fc-c"))
        assert rc.status == 201, rc
        sa = c.streams[a]
        assert not sa.done, sa
        assert len(sa.body) <= 65535, "the server sent past the stream's window: %d" % len(
            sa.body)
        c.open_window(a)
        ra = c.response(a, timeout=30)
        assert ra.status == 200 and len(ra.body) == MIB, (ra.status, len(ra.body))
        assert ra.body == big_body(MIB)


def test_request_body_larger_than_the_window(gate, upstream, transport):
    """300 KB up (the default window is 65535): the server opens its
    window as it reads; the body arrives whole; the retry replays."""
    g = gate(transport)
    body = os.urandom(300000)
    with connect(g) as c:
        r1 = c.response(c.request("POST", "/upload", hdrs("h2-up"), body), timeout=30)
        assert r1.status == 200, r1
        assert r1.json() == {"len": 300000, "sha256": hashlib.sha256(body).hexdigest()}
        r2 = after_release(lambda: c.response(c.request("POST", "/upload", hdrs("h2-up"),
                                                        body), timeout=30))
        assert_replay(r2, r1)
    assert upstream.count("h2-up") == 1


def test_hpack_huge_client_table_and_large_headers(gate, transport):
    """The client allows a 2^31-1 byte table for the server's encoder; the
    server accepts it and keeps its own table bounded. Three requests with
    40 headers of 900 bytes (about 40 KB: under max_header_bytes) get
    through whole; large response headers come back whole."""
    g = gate(transport)
    table = SettingCodes.HEADER_TABLE_SIZE
    big = [("x-big-%02d" % i, ("%02d" % i) * 450) for i in range(40)]
    with connect(g, settings={table: 2 ** 31 - 1}) as c:
        for n in range(3):
            r = c.response(c.request("GET", "/echo?round=%d" % n, big))
            assert r.status == 200, r
            got = {k.lower(): v for k, v in r.json()["headers"]}
            for k, v in big:
                assert got.get(k) == v, (n, k, got.get(k, "")[:40])
        q = "&".join("set=X-Resp-%d:%s" % (i, chr(97 + i) * 300) for i in range(5))
        for n in range(2):
            r = c.response(c.request("GET", "/headers?" + q))
            assert r.status == 200, r
            for i in range(5):
                assert r.header("x-resp-%d" % i) == chr(97 + i) * 300, r
        assert c.settings_acks >= 1, "SETTINGS never acknowledged: " + c.describe()
        size = c.conn.decoder.header_table.maxsize
        assert size <= MIB, "the server's HPACK encoder uses a %d byte table" % size
    assert_healthy(g)


@pytest.mark.parametrize("after", ["preface", "request"])
def test_idle_connection_closed(gate, transport, after):
    g = gate(transport, limits={"client_timeout_ms": 500})
    with connect(g) as c:
        if after == "request":
            assert c.response(c.request("GET", "/echo")).status == 200
        assert c.wait_closed(10), "idle connection still open: " + c.describe()
    assert_healthy(g)


def test_trickled_request_gets_408(gate, upstream, transport):
    """client_timeout_ms bounds the time to receive a whole request, as over
    HTTP/1.1: a stream whose body keeps trickling in (a frame every 100 ms,
    which keeps the connection from ever being idle) is answered 408 and
    never forwarded, and the connection goes on serving."""
    g = gate(transport, limits={"client_timeout_ms": 500})
    with connect(g) as c:
        sid = c.next_stream_id()
        c.send_headers(sid, c.request_headers("POST", "/count", hdrs("h2-trickle")))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not c.streams[sid].done:
            c.send_data(sid, b"x")
            c.read(0.1)
        r = c.response(sid, timeout=5)
        assert r.status == 408, r
        assert r.json()["error"]["code"] == "bad_request", r  # docs/errors.md: 408
        assert c.response(c.request("GET", "/echo")).status == 200
    assert upstream.count("h2-trickle") == 0


def test_sigterm_goaway_then_the_open_stream_completes(gate, upstream, transport):
    g = gate(transport, limits={"shutdown_grace_ms": 5000})
    with connect(g) as c:
        sid = c.post("/count?ms=1500", "h2-term")
        wait_upstream_saw(upstream, "h2-term")
        g.proc.send_signal(signal.SIGTERM)
        ga = c.wait_goaway(10)
        assert ga is not None, "no GOAWAY after SIGTERM: " + c.describe()
        assert ga.last_stream_id >= sid, ga
        r = c.response(sid, timeout=15)
        assert r.status == 201 and r.json() == {"n": 1, "key": "h2-term"}, r
        st = c.streams[sid]
        assert c.goaways[0].index < st.end_index, (
            "the GOAWAY came only after the stream ended: " + c.describe())
        assert all(x.error_code == 0 for x in c.goaways), c.goaways
        assert c.wait_closed(10), "connection still open: " + c.describe()
    assert g.proc.wait(timeout=15) == 0, log_tail(g)


# -- curl ----------------------------------------------------------------------------


def curl(args, timeout=30):
    """curl -sS with args, the headers and the body written to files;
    returns (http_version, status, headers {lowercase: value}, body)."""
    if not shutil.which("curl"):
        pytest.skip("no curl")
    d = os.environ.get("TMPDIR", "/tmp")
    hfile = os.path.join(d, "idemtest-h2-curl-%d.h" % os.getpid())
    bfile = os.path.join(d, "idemtest-h2-curl-%d.b" % os.getpid())
    try:
        res = subprocess.run(["curl", "-sS", "--max-time", "15", "-D", hfile, "-o", bfile,
                              "-w", "%{http_version}"] + args,
                             capture_output=True, text=True, timeout=timeout, check=False)
        assert res.returncode == 0, "curl exit %d: %s" % (res.returncode, res.stderr)
        with open(hfile, "rb") as f:
            head = f.read().decode("latin-1")
        with open(bfile, "rb") as f:
            body = f.read()
    finally:
        for p in (hfile, bfile):
            if os.path.exists(p):
                os.unlink(p)
    lines = [ln for ln in head.split("\r\n") if ln]
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return res.stdout.strip(), status, headers, body


@pytest.mark.parametrize("how", ["prior_knowledge", "tls_alpn"])
def test_curl_post_then_replay(gate, upstream, how):
    g = gate("tls" if how == "tls_alpn" else "h2c")
    if how == "tls_alpn":
        args = ["--http2", "-k", "https://127.0.0.1:%d/count" % g.port]
    else:
        args = ["--http2-prior-knowledge", "http://127.0.0.1:%d/count" % g.port]
    args += ["-H", "Idempotency-Key: curl-" + how, "-H", "Authorization: Bearer k1",
             "-H", "Content-Type: application/json", "--data-binary", BODY.decode()]
    v1, s1, h1_, b1 = curl(args)
    assert v1 == "2", "curl spoke HTTP/%s" % v1
    assert s1 == 201 and "idempotent-replayed" not in h1_, (s1, h1_, b1)
    assert json.loads(b1) == {"n": 1, "key": "curl-" + how}
    v2, s2, h2_, b2 = after_release(lambda: _curl_resp(args))
    assert v2 == "2", "curl spoke HTTP/%s" % v2
    assert s2 == 201 and h2_.get("idempotent-replayed") == "true", (s2, h2_)
    assert b2 == b1
    assert upstream.count("curl-" + how) == 1


class _CurlAnswer(tuple):
    """curl()'s tuple with .status and .body, for after_release()."""

    @property
    def status(self):
        return self[1]

    @property
    def body(self):
        return self[3]


def _curl_resp(args):
    return _CurlAnswer(curl(args))
