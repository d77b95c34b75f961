"""Clients that record every attempt exactly as it ended (the fault suite and
the exactly-once checker).

Owns: Attempt (how one request ended: answer, cut body, timeout,
disconnect, deliberate abandon); AttemptClient (raw sockets, one kept-alive
connection per idemgate port); Policy and session() (a client retrying one
key: backoff, bounded); Recorder (a thread-safe list of attempts);
fresh_request_ok(). Running many sessions at once is storm.run_sessions();
holding the attempts against the execution log is invariant.analyze().
"""

import os
import random
import socket
import threading
import time

from .assertions import error_code
from .http import BODY, header_value, post_bytes, read_response

# The docs/errors.md answers a client retries (a lost answer is final).
RETRYABLE = {(409, "request_in_progress"), (503, "store_unavailable"),
             (502, "upstream_unavailable"), (504, "upstream_timeout")}


class Attempt:
    """How one request ended. kind: "answer" (a complete response), "cut"
    (a head arrived, then the connection ended inside the body), "timeout",
    "disconnect" (refused, reset or closed before a head), "abandoned" (we
    left on purpose: mid-body or before reading). status/headers/body/code
    are set when a head arrived (body partial for "cut")."""

    __slots__ = ("key", "port", "t0", "t1", "kind", "status", "headers", "body",
                 "code", "replayed", "abandon", "session")

    def __init__(self, key, port, abandon=None, session=None):
        self.key, self.port, self.abandon, self.session = key, port, abandon, session
        self.t0 = time.time()
        self.t1 = None
        self.kind = None
        self.status = None
        self.headers = []
        self.body = b""
        self.code = None
        self.replayed = False

    def header(self, name):
        return header_value(self.headers, name)

    def ok(self):
        return self.kind == "answer" and 200 <= self.status < 300

    def spec_error(self):
        return (self.status, self.code) if self.kind == "answer" and not self.ok() else None

    def label(self):
        if self.kind == "answer":
            return "%d %s" % (self.status, self.code or "")
        return self.kind

    def __repr__(self):
        return "Attempt(%s port=%d %s replayed=%s body=%r)" % (
            self.key, self.port, self.label(), self.replayed, self.body[:120])


class AttemptClient:
    """One client's connections, one per idemgate port, kept alive between
    attempts while the answers allow it (.socks: port -> socket)."""

    def __init__(self, timeout=10.0, cred="k1"):
        self.timeout = timeout
        self.cred = cred
        self.socks = {}

    def close(self):
        for s in self.socks.values():
            s.close()
        self.socks = {}

    def _drop(self, port):
        s = self.socks.pop(port, None)
        if s is not None:
            s.close()

    def post(self, port, path, key, body=BODY, abandon=None, session=None):
        """One attempt; abandon None, "midbody" (head and half the body, then
        close) or "noread" (the whole request, then close unread)."""
        a = Attempt(key, port, abandon, session)
        try:
            self._post(a, port, path, body)
        finally:
            a.t1 = time.time()
        return a

    def _post(self, a, port, path, body):
        deadline = time.monotonic() + self.timeout
        head, body = post_bytes(path, a.key, body, self.cred, "127.0.0.1:%d" % port)
        s = self.socks.get(port)
        try:
            if s is None:
                s = socket.create_connection(("127.0.0.1", port), timeout=self.timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.socks[port] = s
            if a.abandon == "midbody":
                s.sendall(head + body[:len(body) // 2])
                a.kind = "abandoned"
                self._drop(port)
                return
            s.sendall(head + body)
            if a.abandon == "noread":
                time.sleep(random.uniform(0, 0.05))
                a.kind = "abandoned"
                self._drop(port)
                return
        except OSError:
            a.kind = "disconnect"
            self._drop(port)
            return
        kind, resp, data = read_response(s, deadline)
        a.kind = kind
        if resp is not None:
            a.status, a.headers, a.body = resp.status, resp.headers, data
            a.replayed = resp.header("Idempotent-Replayed") == "true"
            if not 200 <= resp.status < 300:
                a.code = error_code(data)
        conn_hdr = (resp.header("Connection") or "").lower() if resp is not None else ""
        if kind != "answer" or conn_hdr == "close":
            self._drop(port)


class Policy:
    """How a client retries one key: each attempt bounded by
    attempt_timeout, at most max_attempts within budget seconds, full-jitter
    exponential backoff from backoff to backoff_cap. abandon_midbody /
    abandon_noread: the share of attempts it leaves on purpose."""

    def __init__(self, attempt_timeout=10.0, max_attempts=40, budget=15.0,
                 backoff=0.05, backoff_cap=1.0, abandon_midbody=0.0,
                 abandon_noread=0.0):
        self.attempt_timeout = attempt_timeout
        self.max_attempts = max_attempts
        self.budget = budget
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.abandon_midbody = abandon_midbody
        self.abandon_noread = abandon_noread


def session(client, ports, path, key, policy, rng, record, body=BODY, sid=None,
            stop=None):
    """Works on key until a 2xx, a lost answer confirmed by one retry, an
    answer no client would retry, or the policy's bounds; every attempt is
    passed to record. Returns the last attempt."""
    t_start = time.monotonic()
    last = None
    lost_seen = 0
    for n in range(policy.max_attempts):
        abandon = None
        if lost_seen == 0:
            x = rng.random()
            if x < policy.abandon_midbody:
                abandon = "midbody"
            elif x < policy.abandon_midbody + policy.abandon_noread:
                abandon = "noread"
        last = client.post(rng.choice(ports), path, key, body, abandon, sid)
        record(last)
        if last.ok():
            return last
        err = last.spec_error()
        if err == (502, "upstream_answer_lost"):
            lost_seen += 1
            if last.replayed or lost_seen >= 2:
                return last
        elif err is not None and err not in RETRYABLE:
            return last  # nothing a client would retry
        if time.monotonic() - t_start >= policy.budget or (stop and stop.is_set()):
            return last
        delay = min(policy.backoff_cap, policy.backoff * (2 ** n)) * rng.uniform(0.5, 1.0)
        time.sleep(delay)
    return last


class Recorder:
    """Thread-safe list of attempts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.attempts = []

    def __call__(self, a):
        with self.lock:
            self.attempts.append(a)

    def snapshot(self):
        with self.lock:
            return list(self.attempts)


def fresh_request_ok(port, key=None, path="/pay", timeout=10):
    """A new covered request on a new connection: executed and answered
    2xx (the instance is alive and serves). Returns the Attempt."""
    key = key or "fresh-%d-%d" % (os.getpid(), random.getrandbits(32))
    client = AttemptClient(timeout)
    try:
        return client.post(port, path, key)
    finally:
        client.close()
