"""Helpers for the idempotency-engine integration tests (test_idem*.py).

Owns: a small HTTP client with full control over request headers (repeated
headers, raw bytes), the SPEC section 5 error checks, replay comparison, a
minimal RESP client to read Redis bytes exactly, a starter for upstream.py on
a chosen port, and thread/storm utilities. Fixtures live in conftest.py.
"""

import copy
import http.client
import json
import os
import socket
import threading
import time

import igtest

HERE = os.path.dirname(os.path.abspath(__file__))

# SPEC section 5: code -> type.
ERROR_TYPES = {
    "idempotency_key_required": "invalid_request_error",
    "invalid_idempotency_key": "invalid_request_error",
    "bad_request": "invalid_request_error",
    "credentials_required": "invalid_request_error",
    "request_in_progress": "idempotency_error",
    "idempotency_key_reuse": "idempotency_error",
    "payload_too_large": "invalid_request_error",
    "upstream_unavailable": "api_error",
    "store_unavailable": "api_error",
    "upstream_timeout": "api_error",
    "upstream_answer_lost": "api_error",
}

HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding",
              "upgrade", "proxy-connection", "proxy-authenticate"}

DEFAULT_REPLAY_EXCLUDE = {"set-cookie", "date", "server", "ratelimit-limit",
                          "ratelimit-remaining", "ratelimit-reset"}

BODY = b'{"amount": 100}'


class Resp:
    """One HTTP response: status, reason, headers [(name, value)] in order,
    body bytes (de-chunked)."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        return json.loads(self.body)

    @property
    def replayed(self):
        return self.header("Idempotent-Replayed") == "true"

    def __repr__(self):
        return "Resp(%d %s, headers=%r, body=%r)" % (
            self.status, self.reason, self.headers, self.body[:300])


def _norm_headers(headers):
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def send(port, method, path, headers=None, body=b"", timeout=15, conn=None):
    """Sends one request with exactly the given headers (a dict or a list of
    (name, value) pairs; values may be bytes; repeats allowed) plus Host and
    Content-Length. Uses a fresh connection unless conn (an
    http.client.HTTPConnection) is given."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in _norm_headers(headers):
            conn.putheader(name, value)
        if body or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if body else None)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, r.reason, list(r.getheaders()), data)
    finally:
        if own:
            conn.close()


def hdrs(key=None, api_key="k1", ctype="application/json", extra=None):
    """Request headers for a covered request. key None: no Idempotency-Key;
    api_key None: no Authorization."""
    h = []
    if key is not None:
        h.append(("Idempotency-Key", key))
    if api_key is not None:
        h.append(("Authorization", "Bearer " + api_key))
    if ctype is not None:
        h.append(("Content-Type", ctype))
    if extra:
        h.extend(_norm_headers(extra))
    return h


def post(port, path, key, body=BODY, api_key="k1", method="POST", extra=None,
         ctype="application/json", timeout=15):
    return send(port, method, path, hdrs(key, api_key, ctype, extra), body,
                timeout=timeout)


# -- SPEC section 5 errors -------------------------------------------------

def assert_error(resp, status, code, problem=False):
    """Checks one idemgate-generated error: status, content type, and the
    JSON body shape with the SPEC section 5 type for code."""
    assert resp.status == status, resp
    assert not resp.replayed, resp
    ctype = (resp.header("Content-Type") or "").split(";")[0].strip().lower()
    try:
        doc = json.loads(resp.body)
    except ValueError as e:
        raise AssertionError("error body is not JSON: %r (%s)" % (resp.body, e))
    if problem:
        assert ctype == "application/problem+json", resp
        for member in ("type", "title", "status", "detail", "code"):
            assert member in doc, (member, doc)
        assert doc["status"] == status, doc
        assert doc["code"] == code, doc
        assert isinstance(doc["type"], str) and doc["type"], doc
        assert isinstance(doc["title"], str) and doc["title"], doc
        assert isinstance(doc["detail"], str), doc
    else:
        assert ctype == "application/json", resp
        assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), doc
        err = doc["error"]
        assert err.get("code") == code, doc
        assert err.get("type") == ERROR_TYPES[code], doc
        assert isinstance(err.get("message"), str) and err["message"], doc
    return doc


def assert_in_progress(resp, problem=False):
    assert_error(resp, 409, "request_in_progress", problem)
    assert resp.header("Retry-After") == "1", resp


# -- replay comparison -----------------------------------------------------

def e2e_headers(resp, exclude=DEFAULT_REPLAY_EXCLUDE):
    """The headers a replay must reproduce in order: everything but
    hop-by-hop, Date, Idempotent-Replayed, X-Request-Id (per request, set by
    idemgate) and the replay_exclude_headers."""
    skip = set(HOP_BY_HOP) | {"date", "idempotent-replayed", "x-request-id"}
    skip |= {h.lower() for h in exclude}
    return [(k.lower(), v) for k, v in resp.headers if k.lower() not in skip]


def assert_replay_of(replay, first, exclude=DEFAULT_REPLAY_EXCLUDE):
    assert first.header("Idempotent-Replayed") is None, first
    assert replay.header("Idempotent-Replayed") == "true", replay
    assert len(replay.header_all("Idempotent-Replayed")) == 1, replay
    assert replay.status == first.status, (first, replay)
    assert replay.reason == first.reason, (first, replay)
    assert replay.body == first.body, (first, replay)
    assert e2e_headers(replay, exclude) == e2e_headers(first, exclude), (
        first.headers, replay.headers)


# -- upstream ---------------------------------------------------------------

def stats(upstream_port):
    return send(upstream_port, "GET", "/__stats").json()


def ucount(upstream_port, key):
    return stats(upstream_port)["by_key"].get(key, 0)


def wait_until(pred, timeout=10.0, interval=0.02):
    """Polls pred until true or timeout; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def after_release(fn, timeout=5.0):
    """Calls fn() again while it answers 409 request_in_progress: the client
    may see the end of a response a moment before the store write that
    follows it (complete or release). The final answer is what the test
    checks."""
    deadline = time.monotonic() + timeout
    while True:
        r = fn()
        if not (r.status == 409 and b"request_in_progress" in r.body):
            return r
        if time.monotonic() >= deadline:
            return r
        time.sleep(0.05)


def wait_upstream_saw(upstream_port, key, n=1, timeout=10.0):
    """Waits until the upstream counted n executions of key (it counts when
    the request arrives, before any ?ms sleep)."""
    ok = wait_until(lambda: ucount(upstream_port, key) >= n, timeout)
    assert ok, "upstream never saw %d execution(s) of %r: %r" % (
        n, key, stats(upstream_port))


Upstream = igtest.Upstream  # upstream.py on a chosen port


def unused_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- config ----------------------------------------------------------------

def merge(base, over):
    """Deep merge of dicts (over wins); returns a new dict."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def gate_config(store_cfg, upstream_url, idem=None, **top):
    cfg = merge({"upstream": upstream_url}, store_cfg)
    if idem:
        cfg = merge(cfg, {"idempotency": idem})
    return merge(cfg, top)


def store_config(kind, redis):
    """The store settings for kind "memory" or "redis" (on that Redis)."""
    if kind == "redis":
        return {"store": "redis", "redis": {"url": redis.url}}
    return {"store": "memory"}


STORES = ["memory", "redis"]


def store_param_config(request):
    """store_config() for a fixture parametrized over STORES (the conftest
    `redis` fixture is started only for "redis")."""
    redis = (request.getfixturevalue("redis") if request.param == "redis"
             else None)
    return store_config(request.param, redis)


# -- threads ---------------------------------------------------------------

class Bg:
    """Runs fn(*args) in a daemon thread; result() re-raises its exception."""

    def __init__(self, fn, *args, **kwargs):
        self._res = None
        self._exc = None
        self._t = threading.Thread(target=self._run, args=(fn, args, kwargs),
                                   daemon=True)
        self._t.start()

    def _run(self, fn, args, kwargs):
        try:
            self._res = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in result()
            self._exc = e

    def result(self, timeout=30):
        self._t.join(timeout)
        assert not self._t.is_alive(), "background request did not finish"
        if self._exc is not None:
            raise self._exc
        return self._res


def storm(ports, path, key, n, body=BODY, api_key="k1", timeout=30):
    """n clients, each with its own connection (opened before the barrier),
    released together, client i sending to ports[i % len(ports)]. Returns
    the list of Resp (or exceptions) in client order."""
    return storm_each(ports, n, lambda i: (
        path, hdrs(key if isinstance(key, str) else key(i), api_key), body),
        timeout)


def storm_each(ports, n, request, timeout=30):
    """Like storm() but client i POSTs request(i) = (path, headers, body)."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", ports[i % len(ports)],
                                          timeout=timeout)
        try:
            conn.connect()
            barrier.wait(timeout)
            path, headers, body = request(i)
            results[i] = send(ports[i % len(ports)], "POST", path, headers,
                              body, conn=conn)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            results[i] = e
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert not any(t.is_alive() for t in threads), "storm clients hung"
    return results


def storm_two_bodies(port, upstream_port, path, key, n=40):
    """n clients, one key, half of them with another body: exactly one
    execution; the other body's clients get 409 idempotency_key_reuse, the
    winner's body's clients 409 request_in_progress or the replay."""
    bodies = [BODY if i % 2 == 0 else b'{"amount": 7}' for i in range(n)]
    results = storm_each([port], n, lambda i: (path, hdrs(key), bodies[i]))
    assert not [r for r in results if isinstance(r, BaseException)], results
    originals = [i for i, r in enumerate(results)
                 if r.status == 201 and not r.replayed]
    assert len(originals) == 1, results
    win = bodies[originals[0]]
    for i, r in enumerate(results):
        if i == originals[0]:
            continue
        if bodies[i] != win:
            assert_error(r, 409, "idempotency_key_reuse")
        elif r.status == 409:
            assert_in_progress(r)
        else:
            assert_replay_of(r, results[originals[0]])
    assert ucount(upstream_port, key) == 1


# -- Redis, byte-exact -------------------------------------------------------

class RespClient:
    """Minimal RESP2 client returning raw bytes (redis-cli escapes output)."""

    def __init__(self, port, timeout=5):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest
        if t == b"-":
            raise RuntimeError(rest.decode("latin-1"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError("bad RESP reply %r" % line)

    def cmd(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def keys(self):
        found, cursor = [], b"0"
        while True:
            cursor, batch = self.cmd("SCAN", cursor, "COUNT", 1000)
            found.extend(batch)
            if cursor == b"0":
                return sorted(set(found))

    def contents(self, key):
        """Every byte stored under key, by type (plus DUMP)."""
        t = self.cmd("TYPE", key)
        parts = [key]
        if t == b"string":
            parts.append(self.cmd("GET", key))
        elif t == b"hash":
            parts.extend(self.cmd("HGETALL", key))
        elif t == b"list":
            parts.extend(self.cmd("LRANGE", key, 0, -1))
        elif t == b"set":
            parts.extend(self.cmd("SMEMBERS", key))
        elif t == b"zset":
            parts.extend(self.cmd("ZRANGE", key, 0, -1, "WITHSCORES"))
        elif t == b"stream":
            parts.append(repr(self.cmd("XRANGE", key, "-", "+")).encode())
        dump = self.cmd("DUMP", key)
        if dump:
            parts.append(dump)
        return t, [p for p in parts if p is not None]
