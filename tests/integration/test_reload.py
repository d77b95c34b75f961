"""Configuration reload: SIGHUP, or POST /-/reload on the admin listener,
re-reads the configuration from the sources of the start (the -c file, the
environment, the flags), checks it as -t does and, when it is valid, swaps
it in without closing a connection.

What a test checks, each reload made both ways where both make sense (the
`how` parameter: "sighup" or "post"):

- new requests get the new routes and upstreams (a group too); the POST
  answer is {"result": "ok", "generation": N}, N 1 at start and +1 per
  successful reload, SIGHUP reloads included;
- a request in flight during the reload finishes under the configuration it
  started with (its upstream, its key stored and replayed), and a keep-alive
  connection opened before the reload serves the next request on the same
  socket, under the new configuration;
- a failed reload (invalid JSON, a value out of range, an unknown key)
  changes nothing: POST answers 400 {"result": "failed", "error": <the line
  `idemgate -t` prints for the file>, "generation": <the old N>}, one error
  log line holds that text, idemgate_reloads_total{result="failed"} counts
  it once;
- keys that need a restart (listen, workers, admin.listen, store) are not
  applied: one line each names the key and says `ignored`, the rest of the
  file is applied, the listeners stay where they were;
- idempotency policies (required, methods), admin.token, the TLS
  certificate (same paths rewritten, or new paths), redis.url (another
  redis-server), log.level follow the file;
- /-/reload: the /keys auth rule (Bearer admin.token: 401 without it;
  without a token loopback peers only: 403), 405 for any other method;
- the environment and the flags given at start still override the file
  after a reload.

A SIGHUP reload is known to be done when idemgate_reloads_total on
/metrics has counted it; a process that exits on SIGHUP fails at once (the
binary before the reload feature does). Everything is real: idemgate,
redis-server, upstream.py processes and HTTP listeners of this process on
127.0.0.1; every wait is a bounded poll.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time

import pytest

from idemtest.assertions import (after_release, assert_error, assert_replay_of,
                                 first_answer, wait_until)
from idemtest.certs import make_certs
from idemtest.config import merge
from idemtest.http import Client, metrics, post, read_request, request
from idemtest.procs import RawServer, free_port, non_loopback_ipv4, port_open, wait_port

HOWS = ["sighup", "post"]
RELOAD = "/-/reload"
BODY = b'{"amount": 100}'
CRED = "Bearer k1"  # what post(..., api_key="k1") sends as Authorization
OK = 'idemgate_reloads_total{result="ok"}'
FAILED = 'idemgate_reloads_total{result="failed"}'


# -- starting, reloading ---------------------------------------------------------


@pytest.fixture
def gate(idemgate):
    """start(cfg, args=(), env=None, admin_host="127.0.0.1") -> idemgate
    (procs.Idemgate) with the memory store unless cfg says otherwise and an
    admin listener on a free port of admin_host; its port is .admin."""
    def start(cfg, args=(), env=None, admin_host="127.0.0.1"):
        admin = free_port()
        cfg = merge({"store": "memory",
                     "admin": {"listen": "%s:%d" % (admin_host, admin)}}, cfg)
        g = idemgate(cfg, args=args, env=env)
        assert wait_port(admin, proc=g.proc), g.stderr()
        g.admin = admin
        return g
    return start


def log_tail(g, n=20):
    return "\n".join(g.stderr().splitlines()[-n:])


def assert_alive(g):
    code = g.proc.poll()
    if code is not None:
        how = "killed by %s" % signal.Signals(-code).name if code < 0 else "exit %d" % code
        raise AssertionError("idemgate is gone (%s); its log ends:\n%s" % (how, log_tail(g)))


def reload_counts(g):
    """{"ok": n, "failed": n} from idemgate_reloads_total on /metrics (0
    for a sample not there)."""
    try:
        m = metrics(g.admin)
    except OSError as e:
        failure = e  # said outside the except: no chained traceback
    else:
        return {"ok": m.get(OK, 0), "failed": m.get(FAILED, 0)}
    # a process that is exiting drops its connections before it can be reaped
    try:
        g.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    assert_alive(g)
    raise failure


def await_counts(g, before, want, timeout=10.0):
    """Waits until the reload counters go from before to want; fails at once
    when idemgate exits or they move anywhere else."""
    deadline = time.monotonic() + timeout
    while True:
        assert_alive(g)
        got = reload_counts(g)
        if got == want:
            return
        assert got == before, "reload counters went from %r to %r, want %r:\n%s" % (
            before, got, want, log_tail(g))
        assert time.monotonic() < deadline, "reload never counted (%r, want %r):\n%s" % (
            got, want, log_tail(g))
        time.sleep(0.02)


def post_reload(port, token=None, method="POST", host="127.0.0.1"):
    """One request to /-/reload (Authorization: Bearer token when given)."""
    h = [("Authorization", "Bearer " + token)] if token is not None else []
    return request(port, method, RELOAD, h, host=host)


def reload_doc(r, status, result):
    """The JSON answer of /-/reload, checked: status, content type,
    result, an integer generation."""
    assert r.status == status, r
    assert (r.header("Content-Type") or "").startswith("application/json"), r
    doc = r.json()
    assert doc.get("result") == result, doc
    assert isinstance(doc.get("generation"), int), doc
    return doc


def reload(g, how, token=None, result="ok"):
    """Reloads g by SIGHUP or POST /-/reload (with token) and waits until
    idemgate_reloads_total{result} has counted it (+1, the other count
    unchanged). Returns the POST answer's JSON (reload_doc), None for
    SIGHUP."""
    before = reload_counts(g)
    want = dict(before, **{result: before[result] + 1})
    doc = None
    if how == "post":
        doc = reload_doc(post_reload(g.admin, token), 200 if result == "ok" else 400, result)
    else:
        g.proc.send_signal(signal.SIGHUP)
    await_counts(g, before, want)
    return doc


def rewrite(g, **changes):
    """Rewrites g's -c file: its current configuration with changes
    deep-merged (config.merge)."""
    cfg = merge(g.config, changes)
    g.write_config(cfg)
    return cfg


def t_line(g):
    """The one line `idemgate -t` prints for g's sources as they are now
    (it must refuse them: exit 2)."""
    res = g.check_config()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    return lines[0]


def echo_port(port, path, **kw):
    """The port of the upstream.py that answered GET path through idemgate."""
    r = request(port, "GET", path, **kw)
    assert r.status == 200, r
    return r.json()["port"]


def msgs(g, level=None):
    return [ln.get("msg", "") for ln in g.log_lines()
            if level is None or ln.get("level") == level]


# -- an upstream of this process that can hold an answer ------------------------


class Backend(RawServer):
    """An HTTP/1.1 upstream (keep-alive, a thread per connection) named
    name: answers 201 JSON {"upstream": name, "path", "key", "n"} (n: its
    executions of that key); a request to /hold waits until .release is
    set. .seen(key) counts the requests with that Idempotency-Key."""

    def __init__(self, name):
        self.name = name
        self.lock = threading.Lock()
        self.log = []
        self.release = threading.Event()
        super().__init__(self._serve)

    def seen(self, key):
        with self.lock:
            return sum(1 for _, k in self.log if k == key)

    @staticmethod
    def _read(c, buf):
        """(path, Idempotency-Key) of the next request, or None."""
        req, rest = read_request(c, buf)
        if req is None:
            return None, rest
        _, target, hdrs = req
        return (target.split("?")[0], hdrs.get("idempotency-key")), rest

    def _serve(self, c):
        buf = b""
        try:
            while True:
                req, buf = self._read(c, buf)
                if req is None:
                    return
                path, key = req
                with self.lock:
                    self.log.append((path, key))
                    n = sum(1 for _, k in self.log if k == key)
                if path == "/hold":
                    self.release.wait(30)
                body = json.dumps({"upstream": self.name, "path": path, "key": key,
                                   "n": n}).encode()
                c.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            return


@pytest.fixture
def backends():
    made = []

    def make(name):
        b = Backend(name)
        made.append(b)
        return b
    yield make
    for b in made:
        b.release.set()
        b.close()


# -- 1. routes and upstreams --------------------------------------------------------


@pytest.mark.parametrize("how", HOWS)
def test_route_added_by_reload(gate, upstream, upstream2, how):
    """A route for /r to B, then /r back to A and /s to a group of A and B;
    the generation counts SIGHUP reloads too."""
    a, b = upstream, upstream2
    g = gate({"upstream": a.url})
    assert echo_port(g.port, "/r/x") == a.port
    assert echo_port(g.port, "/other") == a.port

    rewrite(g, routes=[{"prefix": "/r", "upstream": b.url}])
    doc = reload(g, how)
    if doc is not None:
        assert doc["generation"] == 2, doc
    assert echo_port(g.port, "/r/x") == b.port
    assert echo_port(g.port, "/r") == b.port
    assert echo_port(g.port, "/other") == a.port

    rewrite(g, routes=[{"prefix": "/r", "upstream": a.url},
                       {"prefix": "/s", "upstream": {"servers": [a.url, b.url],
                                                     "balance": "round_robin"}}])
    assert reload(g, "post")["generation"] == 3
    assert echo_port(g.port, "/r/x") == a.port
    # round robin over weights 1 and 1: each server once in every two requests
    seen = [echo_port(g.port, "/s/%d" % i) for i in range(4)]
    assert sorted(seen) == sorted([a.port, b.port] * 2), seen
    assert echo_port(g.port, "/other") == a.port
    assert g.alive()


# -- 2. in flight during a reload ------------------------------------------------------


@pytest.mark.parametrize("how", HOWS)
def test_in_flight_request_finishes_under_old_config(gate, backends, how):
    a, b = backends("A"), backends("B")
    b.release.set()  # only A holds: a retry sent to B by mistake fails at once
    g = gate({"upstream": a.url})
    ka = Client(g.port, timeout=30)
    r = ka.request("GET", "/ka-before")
    assert r.status == 201 and r.json()["upstream"] == "A", r
    sock = ka.conn.sock

    first = {}

    def in_flight():
        try:
            first["r"] = post(g.port, "/hold", "fl-1", BODY, timeout=40)
        except Exception as e:  # noqa: BLE001 - asserted below
            first["e"] = e
    t = threading.Thread(target=in_flight, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: a.seen("fl-1") == 1, 10), "the request never reached A"
        rewrite(g, upstream=b.url)
        reload(g, how)
        # a new request, on a new connection and on the one opened before
        n = post(g.port, "/new", "fl-2", BODY)
        assert n.status == 201 and n.json()["upstream"] == "B", n
        r = ka.request("GET", "/ka-after")
        assert r.status == 201 and r.json()["upstream"] == "B", r
        assert ka.reconnects == 0 and ka.conn.sock is sock, "the keep-alive connection was closed"
        assert t.is_alive() and "r" not in first, first  # still held by A
    finally:
        a.release.set()
        t.join(40)
    assert "e" not in first, first
    r1 = first["r"]
    assert r1.status == 201 and not r1.replayed, r1
    assert r1.json() == {"upstream": "A", "path": "/hold", "key": "fl-1", "n": 1}, r1
    retry = after_release(lambda: post(g.port, "/hold", "fl-1", BODY), must=True)
    assert_replay_of(retry, r1)
    assert a.seen("fl-1") == 1 and b.seen("fl-1") == 0
    r = ka.request("GET", "/ka-last")
    assert r.status == 201 and r.json()["upstream"] == "B" and ka.reconnects == 0, r
    ka.close()


# -- 3. a failed reload -----------------------------------------------------------


def bad_files(cfg):
    """(name, text of the -c file) of invalid configurations that would
    also move the default upstream, were anything of them applied."""
    moved = json.dumps(cfg)
    return [("invalid JSON", moved[:-1] + ",, }"),
            ("out of range", json.dumps(dict(cfg, workers=-1))),
            ("unknown key", json.dumps(dict(cfg, no_such_key=1)))]


@pytest.mark.parametrize("how", HOWS)
def test_failed_reload_changes_nothing(gate, upstream, upstream2, how):
    a, b = upstream, upstream2
    g = gate({"upstream": a.url})
    good = dict(g.config)
    assert reload_counts(g) == {"ok": 0, "failed": 0}
    lines = []
    for i, (name, text) in enumerate(bad_files(dict(good, upstream=b.url)), 1):
        g.write_config(text)
        line = t_line(g)
        lines.append(line)
        doc = reload(g, how, result="failed")
        if doc is not None:
            assert doc["error"] == line, (name, doc, line)
            assert doc["generation"] == 1, (name, doc)
        assert reload_counts(g) == {"ok": 0, "failed": i}, name
        assert wait_until(lambda: any(line in m for m in msgs(g, "error")), 5), (
            name, line, log_tail(g))
        assert sum(line in m for m in msgs(g)) == 1, (name, line, log_tail(g))
        # the old configuration still serves, the process runs on
        assert echo_port(g.port, "/echo") == a.port, name
        assert g.alive(), name
    assert len(set(lines)) == 3, lines
    # a valid file again: the generation had not moved
    g.write_config(dict(good, upstream=b.url))
    assert reload(g, "post")["generation"] == 2
    assert echo_port(g.port, "/echo") == b.port
    assert reload_counts(g) == {"ok": 1, "failed": 3}
    for line in lines:
        assert sum(line in m for m in msgs(g)) == 1, (line, log_tail(g))


# -- 4. keys that need a restart ----------------------------------------------------


def key_named(key):
    """A regex finding the key name as a word of its own (listen, not
    admin.listen nor listening)."""
    return re.compile(r"(?<![\w.])%s(?!\w|\.\w)" % re.escape(key))


@pytest.mark.parametrize("how", HOWS)
def test_restart_only_keys_are_ignored(gate, upstream, upstream2, how):
    """listen, workers, admin.listen and store change in the file with the
    upstream: the upstream is applied, the four are logged as ignored and
    stay as they were (the store is still memory: redis.url points at
    nothing, and keys still replay)."""
    a, b = upstream, upstream2
    g = gate({"upstream": a.url})
    old_port, old_admin = g.port, g.admin
    new_port, new_admin = free_port(), free_port()
    changed = {"listen": "127.0.0.1:%d" % new_port, "workers": 2,
               "admin.listen": "127.0.0.1:%d" % new_admin, "store": "redis"}
    rewrite(g, listen=changed["listen"], workers=2, admin={"listen": changed["admin.listen"]},
            store="redis", redis={"url": "redis://127.0.0.1:%d/0" % free_port()},
            upstream=b.url)
    assert g.check_config().returncode == 0
    doc = reload(g, how)
    if doc is not None:
        assert doc["generation"] == 2, doc

    def ignored():
        return [(i, m) for i, m in enumerate(msgs(g)) if re.search(r"\bignored\b", m, re.I)]

    def named(key):
        return [i for i, m in ignored() if key_named(key).search(m)]
    assert wait_until(lambda: all(named(k) for k in changed), 5), (ignored(), log_tail(g))
    # a line of its own for each key
    assert len({i for k in changed for i in named(k)}) >= len(changed), ignored()
    # the listeners stayed where they were
    assert echo_port(old_port, "/echo") == b.port
    assert request(old_admin, "GET", "/healthz").status == 200
    assert not port_open(new_port) and not port_open(new_admin)
    # still the memory store
    r1 = post(old_port, "/count", "rs-1", BODY)
    assert r1.status == 201, r1
    assert_replay_of(after_release(lambda: post(old_port, "/count", "rs-1", BODY), must=True), r1)
    assert b.count("rs-1") == 1
    assert g.alive()


# -- 5. idempotency policy ----------------------------------------------------------


@pytest.mark.parametrize("how", HOWS)
def test_idempotency_policy_change(gate, upstream, how):
    """methods POST, PATCH -> POST only, and required false -> true."""
    g = gate({"upstream": upstream.url,
              "idempotency": {"methods": ["POST", "PATCH"], "required": False}})
    assert post(g.port, "/count", None, BODY).status == 201  # no key: passes
    p1 = post(g.port, "/count", "pol-1", BODY, method="PATCH")
    assert p1.status == 201 and not p1.replayed, p1
    assert_replay_of(after_release(lambda: post(g.port, "/count", "pol-1", BODY, method="PATCH"),
                                   must=True), p1)

    rewrite(g, idempotency={"methods": ["POST"], "required": True})
    reload(g, how)
    assert_error(post(g.port, "/count", None, BODY), 400, "idempotency_key_required")
    r = post(g.port, "/count", "pol-2", BODY)
    assert r.status == 201 and not r.replayed, r
    assert_replay_of(after_release(lambda: post(g.port, "/count", "pol-2", BODY), must=True), r)
    # PATCH is not covered any more: it passes, a kept answer is not replayed
    for key, runs in (("pol-1", 2), ("pol-3", 1), ("pol-3", 2)):
        r = post(g.port, "/count", key, BODY, method="PATCH")
        assert r.status == 201 and not r.replayed, (key, r)
        assert upstream.count(key) == runs, (key, upstream.stats())
    assert upstream.count("pol-2") == 1


# -- 6. admin.token ------------------------------------------------------------------


def get_key(admin, key, token=None, host="127.0.0.1"):
    h = [("Idempotency-Scope-Credential", CRED)]
    if token is not None:
        h.append(("Authorization", "Bearer " + token))
    return request(admin, "GET", "/keys/" + key, h, host=host)


@pytest.mark.parametrize("how", HOWS)
def test_admin_token_set_by_reload(gate, upstream, how):
    g = gate({"upstream": upstream.url})
    assert post(g.port, "/count", "tok-1", BODY).status == 201
    assert wait_until(lambda: get_key(g.admin, "tok-1").status == 200, 5)  # loopback, no token

    rewrite(g, admin={"token": "t0ken-1"})
    doc = reload(g, how)
    if doc is not None:
        assert doc["generation"] == 2, doc
    before = reload_counts(g)
    for token in (None, "wrong", "t0ken-1x"):
        assert post_reload(g.admin, token).status == 401, token
        assert get_key(g.admin, "tok-1", token).status == 401, token
    # a refused request reloads nothing
    assert reload_counts(g) == before
    r = get_key(g.admin, "tok-1", "t0ken-1")
    assert r.status == 200 and r.json()["state"] == "completed", r
    for path in ("/healthz", "/readyz", "/metrics"):
        assert request(g.admin, "GET", path).status == 200, path
    assert reload(g, "post", token="t0ken-1")["generation"] == 3


def test_reload_other_methods_are_405(gate, upstream):
    g = gate({"upstream": upstream.url})
    for method in ("GET", "HEAD", "PUT", "DELETE", "PATCH"):
        assert post_reload(g.admin, method=method).status == 405, method
    assert reload_counts(g) == {"ok": 0, "failed": 0}
    assert reload(g, "post")["generation"] == 2


# -- 7. TLS certificate ------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_certs(tmp_path_factory):
    """Two server certificates for 127.0.0.1 from two CAs, and a client
    context trusting both."""
    d = tmp_path_factory.mktemp("reload-tls")
    one, two = make_certs(str(d / "one")), make_certs(str(d / "two"))
    ctx = ssl.create_default_context(cafile=one.ca)
    ctx.load_verify_locations(cafile=two.ca)
    return one, two, ctx


def der(cert_path):
    with open(cert_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def peer_der(client):
    return client.conn.sock.getpeercert(binary_form=True)


def copy_over(src, dst):
    """Replaces dst with a copy of src at once (a renamed temporary file)."""
    shutil.copyfile(src, dst + ".new")
    os.replace(dst + ".new", dst)


@pytest.mark.parametrize("paths", ["same_paths", "new_paths"])
@pytest.mark.parametrize("how", HOWS)
def test_tls_certificate_rotation(gate, upstream, two_certs, tmp_path, how, paths):
    one, two, ctx = two_certs
    live_cert, live_key = str(tmp_path / "live.crt"), str(tmp_path / "live.key")
    copy_over(one.cert, live_cert)
    copy_over(one.key, live_key)
    g = gate({"upstream": upstream.url,
              "tls": {"cert_file": live_cert, "key_file": live_key}})
    old = Client(g.port, timeout=20, context=ctx)
    assert old.request("GET", "/echo").status == 200
    assert peer_der(old) == der(one.cert)

    if paths == "same_paths":
        copy_over(two.key, live_key)
        copy_over(two.cert, live_cert)
    else:
        rewrite(g, tls={"cert_file": two.cert, "key_file": two.key})
    reload(g, how)

    new = Client(g.port, timeout=20, context=ctx)
    assert new.request("GET", "/echo").status == 200
    assert peer_der(new) == der(two.cert)
    new.close()
    # the connection of before goes on, with its certificate
    assert old.request("GET", "/echo").status == 200
    assert old.reconnects == 0 and peer_der(old) == der(one.cert)
    old.close()


# -- 8. redis.url ----------------------------------------------------------------------


def redis_name(key):
    """The Redis key of Idempotency-Key key under CRED (docs/admin.md)."""
    return "idem:{%s:%s}" % (hashlib.sha256(CRED.encode()).hexdigest(), key)


@pytest.mark.parametrize("how", HOWS)
def test_redis_url_change(gate, upstream, redis_servers, how):
    r1, r2 = redis_servers.start(), redis_servers.start()
    g = gate({"upstream": upstream.url, "store": "redis", "redis": {"url": r1.url}})

    def exists(server, key):
        return redis_servers.call(server.port, "EXISTS", redis_name(key)) == 1
    a1 = first_answer(g.port, "rd-1")
    assert a1.status == 201 and not a1.replayed, a1
    assert wait_until(lambda: exists(r1, "rd-1"), 5)
    assert redis_servers.call(r2.port, "DBSIZE") == 0

    rewrite(g, redis={"url": r2.url})
    reload(g, how)
    a2 = first_answer(g.port, "rd-2")
    assert a2.status == 201 and not a2.replayed, a2
    assert wait_until(lambda: exists(r2, "rd-2"), 5)
    assert not exists(r1, "rd-2")
    assert_replay_of(after_release(lambda: post(g.port, "/count", "rd-2", BODY), must=True), a2)
    # rd-1 is in the old store only: it runs again, and is kept in the new one
    again = post(g.port, "/count", "rd-1", BODY)
    assert again.status == 201 and not again.replayed, again
    assert upstream.count("rd-1") == 2 and upstream.count("rd-2") == 1
    assert wait_until(lambda: exists(r2, "rd-1"), 5)
    # the admin thread reads the new store too
    assert get_key(g.admin, "rd-2").status == 200
    # nothing needs the old server any more
    r1.kill()
    r = post(g.port, "/count", "rd-3", BODY)
    assert r.status == 201 and not r.replayed, r
    assert wait_until(lambda: exists(r2, "rd-3"), 5)
    assert request(g.admin, "GET", "/readyz").status == 200


# -- 9. log.level ------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOWS)
def test_log_level_change(gate, upstream, how):
    """info -> warn: no access line for requests after the reload, warn
    lines still written.

    How a missing line is known to be missing, without a sleep: on one
    keep-alive connection idemgate reads the next request only once the
    previous exchange let the client go, which is when its access line is
    written; so when the second answer is back, the first request's line
    is in the log or never will be."""
    dead = "http://127.0.0.1:%d" % free_port()
    g = gate({"upstream": upstream.url, "log": {"level": "info"},
              "routes": [{"prefix": "/dead", "upstream": dead}]})
    c = Client(g.port)

    def paths():
        return {ln.get("path") for ln in g.access_lines()}
    for p in ("/before-1", "/before-2"):
        assert c.request("GET", p).status == 200
    assert wait_until(lambda: {"/before-1", "/before-2"} <= paths(), 5), log_tail(g)

    rewrite(g, log={"level": "warn"})
    reload(g, how)
    for p in ("/after-1", "/after-2"):
        assert c.request("GET", p).status == 200
    assert "/after-1" not in paths(), log_tail(g)
    # warn lines are still written
    warns = len(msgs(g, "warn"))
    assert_error(request(g.port, "GET", "/dead/x"), 502, "upstream_unavailable")
    assert wait_until(lambda: len(msgs(g, "warn")) > warns, 5), log_tail(g)
    assert c.request("GET", "/after-3").status == 200
    assert c.reconnects == 0
    assert not {"/after-1", "/after-2"} & paths(), log_tail(g)
    c.close()


# -- 10. who may reload ------------------------------------------------------------------


def test_reload_from_non_loopback_peer(gate, upstream):
    """Without admin.token a peer on another address of this host gets 403;
    once a reload sets a token it gets 401 without it and 200 with it."""
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address: a non-loopback peer cannot be made")
    g = gate({"upstream": upstream.url}, admin_host="0.0.0.0")
    assert post_reload(g.admin, host=addr).status == 403
    assert post_reload(g.admin, token="anything", host=addr).status == 403
    assert reload_counts(g) == {"ok": 0, "failed": 0}
    rewrite(g, admin={"token": "tk-2"})
    assert reload(g, "post")["generation"] == 2  # from 127.0.0.1, no token needed
    assert post_reload(g.admin, host=addr).status == 401
    assert post_reload(g.admin, token="nope", host=addr).status == 401
    assert reload_counts(g) == {"ok": 1, "failed": 0}
    r = post_reload(g.admin, token="tk-2", host=addr)
    assert reload_doc(r, 200, "ok")["generation"] == 3
    assert request(g.admin, "GET", "/healthz", host=addr).status == 200


# -- the sources of a reload --------------------------------------------------------------


def test_reload_rereads_env_and_flags(gate, upstream, upstream2):
    """Flags and the environment given at start still override the file
    after a reload: --upstream over the file's upstream, IDEMGATE_ADMIN_TOKEN
    over its admin.token."""
    a, b = upstream, upstream2
    nowhere = "http://127.0.0.1:%d" % free_port()
    g = gate({"upstream": nowhere, "admin": {"token": "file-1"}},
             args=["--upstream", a.url], env={"IDEMGATE_ADMIN_TOKEN": "env-1"})
    assert echo_port(g.port, "/x") == a.port
    rewrite(g, upstream="http://127.0.0.1:%d" % free_port(), admin={"token": "file-2"},
            routes=[{"prefix": "/r", "upstream": b.url}])
    assert post_reload(g.admin, "file-2").status == 401
    assert reload(g, "post", token="env-1")["generation"] == 2
    assert echo_port(g.port, "/x") == a.port
    assert echo_port(g.port, "/r/x") == b.port
    assert post_reload(g.admin, "file-2").status == 401
    assert post_reload(g.admin, "file-1").status == 401
    assert reload(g, "sighup") is None
    assert echo_port(g.port, "/x") == a.port
    assert reload(g, "post", token="env-1")["generation"] == 4
