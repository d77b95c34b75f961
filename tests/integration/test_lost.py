"""An upstream that breaks in the middle of its answer (docs/requests.md):
a keepable head then a cut body, or a malformed head, means the upstream
ran the request and its answer is lost. The key is kept as *lost*: every
retry gets 502 upstream_answer_lost with Idempotent-Replayed: true and the
upstream never executes it again. Requests that were sent but never
answered follow idempotency.unknown_outcome. Also: stray bytes on a pooled
upstream connection (docs/headers.md), the upstream's own
Idempotent-Replayed, 401/403 released, a replayed HEAD's Content-Length.
Each case runs over HTTP/1.1 and HTTP/2 (the `proto` fixture), but the
stray answer (about the pool behind a keep-alive client).

The upstream here is a raw socket server that logs every execution (path,
Idempotency-Key) and answers each path with scripted bytes."""

import os
import signal
import threading
import time

import pytest

from idemtest.assertions import assert_error, assert_lost_replay, wait_until
from idemtest.config import gate_config
from idemtest.h2 import H2Client
from idemtest.http import connection, post, post_bytes, raw_closed, read_request, split_head
from idemtest.procs import RawServer, free_port

SCRIPTS = {
    "/cut": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nabc",
    "/cut500": b"HTTP/1.1 500 Oops\r\nContent-Length: 10\r\n\r\nabc",
    "/cutchunked": (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n3\r\nab"),
    "/badchunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
    "/dupcl": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    "/gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00zz",
    "/status600": b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
    "/halfhead": b"HTTP/1.1 200 OK\r\nContent-Le",
    "/nohead": b"",
    "/replayed": b"HTTP/1.1 200 OK\r\nIdempotent-Replayed: false\r\nContent-Length: 2\r\n\r\nok",
    "/401": b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope",
    "/403": b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope",
    "/head": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n",
    "/stray": b"HTTP/1.1 204 No Content\r\n\r\n",
}
# after these the connection is closed (the rest stay keep-alive)
CLOSE = {"/cut", "/cut500", "/cutchunked", "/badchunk", "/dupcl", "/gzip", "/status600",
         "/halfhead", "/nohead"}
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"


class ScriptedUpstream(RawServer):
    def __init__(self):
        self.log = []  # (method, path, key) per execution
        self.lock = threading.Lock()
        self.stray_go = threading.Event()
        self.stray_sent = threading.Event()
        super().__init__(self._serve)

    def executions(self, path, key=None):
        with self.lock:
            return sum(1 for _, p, k in self.log if p == path and (key is None or k == key))

    def _serve(self, c):
        buf = b""
        try:
            while True:
                req, buf = read_request(c, buf)
                if req is None:
                    return
                method, path, hdrs = req
                with self.lock:
                    self.log.append((method, path, hdrs.get("idempotency-key")))
                if path == "/silent":
                    time.sleep(30)  # never answers; idemgate times out first
                    return
                c.sendall(SCRIPTS.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine"))
                if path in CLOSE:
                    c.close()
                    return
                if path == "/stray":
                    # a second, unasked-for answer on the same connection,
                    # when the test says so
                    if self.stray_go.wait(10):
                        c.sendall(STRAY)
                        self.stray_sent.set()
        except OSError:
            return


@pytest.fixture
def scripted():
    up = ScriptedUpstream()
    yield up
    up.close()


@pytest.fixture
def gate(idemgate, scripted, store_cfg):
    def start(idem=None, **top):
        return idemgate(gate_config(store_cfg, scripted.url, idem, **top))
    return start


def stopped(pid):
    """Every thread of pid is stopped (SIGSTOP is not synchronous)."""
    tids = os.listdir("/proc/%d/task" % pid)
    for t in tids:
        with open("/proc/%d/task/%s/stat" % (pid, t)) as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "T":
                return False
    return True


def cut_answer(proto, port, path, key, body=b'{"a":1}'):
    """A covered POST whose answer the upstream cuts after its head: the
    client gets what arrived, then over HTTP/1.1 the connection ends, over
    HTTP/2 the stream is reset (never ended as if complete). Returns
    (status, the body bytes that arrived)."""
    if proto.h2:
        with H2Client(port, timeout=10) as c:
            st = c.wait_stream(c.post(path, key, body))
            assert st.status is not None and st.reset_code is not None, c.describe()
            assert not st.ended, c.describe()
            return st.status, st.body
    data, closed = raw_closed(port, b"".join(post_bytes(path, key, body, host="t")),
                              timeout=10)
    assert data.startswith(b"HTTP/1.1 "), data
    assert closed
    resp, rest = split_head(data)
    return resp.status, rest


def outcomes(g, path):
    return [ln.get("outcome") for ln in g.access_lines() if ln.get("path") == path]


@pytest.mark.parametrize("path,cut", [("/cut", b"abc"), ("/cutchunked", b"hello"),
                                      ("/badchunk", b"hello")])
def test_cut_body_is_kept_as_lost(gate, scripted, proto, path, cut):
    g = gate()
    status, body = cut_answer(proto, g.port, path, "cut-1")
    assert 200 <= status < 300 and cut in body, (status, body)
    for _ in range(3):
        assert_lost_replay(proto.post(g.port, path, "cut-1", body=b'{"a":1}'))
    assert scripted.executions(path, "cut-1") == 1
    assert wait_until(lambda: outcomes(g, path) == ["lost"] * 4), outcomes(g, path)


@pytest.mark.parametrize("path", ["/dupcl", "/gzip", "/status600", "/halfhead"])
def test_malformed_head_after_execution_is_lost(gate, scripted, path, proto):
    g = gate()
    r = proto.post(g.port, path, "bad-1")
    assert_error(r, 502, "upstream_answer_lost")
    for _ in range(2):
        assert_lost_replay(proto.post(g.port, path, "bad-1"))
    assert scripted.executions(path, "bad-1") == 1
    # a request with another body under that key is still a mismatch
    assert_error(proto.post(g.port, path, "bad-1", body=b'{"other":2}'), 409,
                 "idempotency_key_reuse")


def test_malformed_head_without_key_is_502_and_never_delivered(gate, scripted, proto):
    g = gate()
    r = proto.request(g.port, "POST", "/gzip", {"Content-Type": "application/json"}, b"{}")
    assert_error(r, 502, "upstream_unavailable")
    assert b"\x1f\x8b" not in r.body


def test_cut_body_of_an_answer_not_kept_releases(gate, scripted, proto):
    g = gate()
    assert cut_answer(proto, g.port, "/cut500", "c500")[0] == 500
    assert cut_answer(proto, g.port, "/cut500", "c500")[0] == 500
    assert scripted.executions("/cut500", "c500") == 2


def test_unanswered_is_released_by_default(gate, scripted, proto):
    g = gate()
    assert_error(proto.post(g.port, "/nohead", "nh"), 502, "upstream_unavailable")
    assert_error(proto.post(g.port, "/nohead", "nh"), 502, "upstream_unavailable")
    assert scripted.executions("/nohead", "nh") == 2


def test_unanswered_is_kept_as_lost_with_unknown_outcome_keep(gate, scripted, proto):
    g = gate({"unknown_outcome": "keep"})
    assert_error(proto.post(g.port, "/nohead", "nh"), 502, "upstream_unavailable")
    assert_lost_replay(proto.post(g.port, "/nohead", "nh"))
    assert scripted.executions("/nohead", "nh") == 1


def test_timed_out_is_kept_as_lost_with_unknown_outcome_keep(gate, scripted, proto):
    g = gate({"unknown_outcome": "keep"}, limits={"upstream_timeout_ms": 300})
    assert_error(proto.post(g.port, "/silent", "to"), 504, "upstream_timeout")
    assert_lost_replay(proto.post(g.port, "/silent", "to"))
    assert scripted.executions("/silent", "to") == 1


def test_never_sent_is_released_even_with_keep(idemgate, store_cfg, proto):
    g = idemgate(gate_config(store_cfg, "http://127.0.0.1:%d" % free_port(),
                             {"unknown_outcome": "keep"}))
    assert_error(proto.post(g.port, "/x", "ns"), 502, "upstream_unavailable")
    assert_error(proto.post(g.port, "/x", "ns"), 502, "upstream_unavailable")  # not a lost replay


def test_stray_answer_on_pooled_connection_is_never_handed_out(gate, scripted):
    """The stray answer and the next request reach idemgate in one batch of
    events, the request first (idemgate is stopped meanwhile): the request
    must not be given the connection that holds the stray bytes."""
    g = gate()
    c = connection(g.port, 10)
    try:
        c.request("GET", "/warm")  # keep-alive client connection, already accepted
        assert c.getresponse().read() == b"fine"
        r = post(g.port, "/stray", "s-1")  # takes the parked upstream connection
        assert r.status == 204
        os.kill(g.proc.pid, signal.SIGSTOP)
        assert wait_until(lambda: stopped(g.proc.pid))
        try:
            # no key: forwarded at once, in the same batch (a covered
            # request would wait for its acquire first)
            c.request("POST", "/next", body=b"{}", headers={"Content-Type": "application/json"})
            scripted.stray_go.set()
            assert scripted.stray_sent.wait(10)
            time.sleep(0.2)  # let loopback deliver it
        finally:
            os.kill(g.proc.pid, signal.SIGCONT)
        resp = c.getresponse()
        body = resp.read()
        assert (resp.status, body) == (200, b"fine"), (resp.status, body)
    finally:
        c.close()
    assert scripted.executions("/next") == 1


@pytest.mark.parametrize("key", [None, "rp-1"])
def test_upstream_idempotent_replayed_header_is_dropped(gate, scripted, key, proto):
    g = gate()
    r = proto.post(g.port, "/replayed", key)
    assert r.status == 200
    assert [v for k, v in r.headers if k.lower() == "idempotent-replayed"] == []
    if key:
        r = proto.post(g.port, "/replayed", key)
        assert [v for k, v in r.headers if k.lower() == "idempotent-replayed"] == ["true"]


@pytest.mark.parametrize("path", ["/401", "/403"])
def test_401_403_are_released(gate, scripted, path, proto):
    g = gate()
    assert proto.post(g.port, path, "auth-1").status == int(path[1:])
    assert proto.post(g.port, path, "auth-1").status == int(path[1:])
    assert scripted.executions(path, "auth-1") == 2


def test_replayed_head_keeps_content_length(gate, scripted, proto):
    g = gate({"methods": ["POST", "HEAD"]})
    h = {"Idempotency-Key": "hd-1", "Authorization": "Bearer k1"}
    first = proto.request(g.port, "HEAD", "/head", h)
    again = proto.request(g.port, "HEAD", "/head", h)
    assert first.header("Content-Length") == "5"
    assert again.header("Idempotent-Replayed") == "true"
    assert again.header("Content-Length") == "5"
    assert scripted.executions("/head", "hd-1") == 1
