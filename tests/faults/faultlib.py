"""faultlib.py — what the fault suite and the exactly-once checker share.

Owns: the execution-logging upstream (execup.py) as a process, a raw-socket
HTTP client that records every attempt exactly as it ended (answer, cut
body, timeout, disconnect, deliberate abandon), a retrying client session
per key (backoff, bounded), and the analysis that holds the attempts
against the upstream's execution log (duplicates, mismatched answers, lost
keys, answers outside SPEC section 5). Processes for redis-server and
idemgate, and response-head parsing, are tests/integration/igtest.py's.
"""

import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATION = os.path.normpath(os.path.join(HERE, "..", "integration"))
if INTEGRATION not in sys.path:
    sys.path.insert(0, INTEGRATION)

import igtest  # noqa: E402

BODY = b'{"amount": 100}'

# SPEC section 5: the answers idemgate may give a covered request while
# things break, besides the upstream's own. (status, code).
SPEC_ERRORS = {(409, "request_in_progress"), (503, "store_unavailable"),
               (502, "upstream_unavailable"), (502, "upstream_answer_lost"),
               (504, "upstream_timeout")}
# ... of which a client retries these (a lost answer is final).
RETRYABLE = {(409, "request_in_progress"), (503, "store_unavailable"),
             (502, "upstream_unavailable"), (504, "upstream_timeout")}


def now():
    return time.time()


def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def poll_until(pred, timeout, interval=0.05):
    """Calls pred until it returns something true or timeout seconds have
    passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


# -- the upstream --------------------------------------------------------


class ExecUpstream:
    """execup.py on one port per idemgate instance, logging to log_path."""

    def __init__(self, log_path, nports=1, ports=None):
        self.log_path = log_path
        self.ports = list(ports or [igtest.free_port() for _ in range(nports)])
        self.urls = ["http://127.0.0.1:%d" % p for p in self.ports]
        self.url = self.urls[0]
        self.port = self.ports[0]
        self.proc = None
        self.start()

    def start(self, drip=True):
        args = [igtest.PYTHON, os.path.join(HERE, "execup.py"), "--log", self.log_path]
        for p in self.ports:
            args += ["--port", str(p)]
        if not drip:
            args.append("--no-drip")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in self.ports:
            if not igtest.wait_port(p, 10, self.proc):
                self.stop()
                raise RuntimeError("execup.py did not start on %d" % p)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def set_mode(self, **kw):
        q = "&".join("%s=%s" % (k, v) for k, v in kw.items())
        r = igtest.request(self.port, "GET", "/__mode?" + q, timeout=5)
        assert r.status == 200, r

    def events(self):
        out = []
        try:
            with open(self.log_path, "rb") as f:
                for line in f:
                    if line.endswith(b"\n"):
                        out.append(json.loads(line))
        except FileNotFoundError:
            pass
        return out

    def execs(self):
        return [e for e in self.events() if e["ev"] == "exec"]

    def heads(self):
        return [e for e in self.events() if e["ev"] == "head"]


# -- one HTTP attempt ----------------------------------------------------


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
        self.t0 = now()
        self.t1 = None
        self.kind = None
        self.status = None
        self.headers = []
        self.body = b""
        self.code = None
        self.replayed = False

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

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


def request_bytes(port, path, key, body, cred="k1"):
    head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nIdempotency-Key: %s\r\n"
            "Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (path, port, key, cred, len(body)))
    return head.encode(), body


def _framing_done(resp, data):
    """(finished, body) for the bytes after a head."""
    te = (resp.header("Transfer-Encoding") or "").lower()
    if resp.status in (204, 304) or 100 <= resp.status < 200:
        return True, b""
    if "chunked" in te:
        return igtest.dechunk_partial(data)[::-1]
    cl = resp.header("Content-Length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            return False, data
        return len(data) >= n, data[:n]
    return False, data  # ends at close


def read_response(sock, deadline):
    """Reads one response. Returns (kind, Resp or None, body)."""
    data = b""
    resp = None
    while True:
        if resp is None:
            resp, rest = igtest.split_head(data)
            if resp is not None:
                data = rest
        if resp is not None:
            done, body = _framing_done(resp, data)
            if done:
                return "answer", resp, body
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", resp, data
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return "timeout", resp, data
        except OSError:
            chunk = b""
        if not chunk:
            if resp is None:
                return "disconnect", None, b""
            te = (resp.header("Transfer-Encoding") or "").lower()
            if resp.header("Content-Length") is None and "chunked" not in te:
                return "answer", resp, data  # close-delimited
            return "cut", resp, _framing_done(resp, data)[1]
        data += chunk


class HttpClient:
    """One client's connections, one per idemgate port, kept alive between
    attempts while the answers allow it."""

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
            a.t1 = now()
        return a

    def _post(self, a, port, path, body):
        deadline = time.monotonic() + self.timeout
        head, body = request_bytes(port, path, a.key, body, self.cred)
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


def error_code(body):
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return doc["error"].get("code")
    if isinstance(doc, dict):
        return doc.get("code")
    return None


# -- a client working on one key -----------------------------------------


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


def run_sessions(jobs, ports, path, policy, threads=20, seed=1, stop=None,
                 timeout=120):
    """Runs jobs (a list of keys; a key listed twice gets two concurrent
    sessions) on `threads` client threads. Returns the Recorder. Every
    thread is joined within timeout (the policy bounds each session)."""
    rec = Recorder()
    lock = threading.Lock()
    queue = list(jobs)

    def worker(i):
        rng = random.Random(seed * 1000 + i)
        client = HttpClient(policy.attempt_timeout)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    key = queue.pop(0)
                session(client, ports, path, key, policy, rng, rec, sid=i, stop=stop)
        finally:
            client.close()

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in ts), "client sessions did not end in %ss" % timeout
    return rec


# -- analysis ------------------------------------------------------------


class Report:
    """What the attempts and the execution log say together. Definitions
    (the exactly-once checker's docstring says the same in more words):
      keys          keys some client sent (excluded ones included)
      requests      attempts made
      executions    upstream executions of those keys
      duplicates    keys (not excluded) executed more than once
      mismatched    2xx answers (and cut 2xx bodies) that are not, byte for
                    byte, the one execution of their key: another key's
                    execution, a body or X-Exec the log does not have, a
                    second execution's answer, or a second fresh (not
                    replayed) answer of one execution
      lost          keys (not excluded) whose clients never got a 2xx
      answer_lost   of those, keys answered 502 upstream_answer_lost
      unexpected    answers that are neither a 2xx nor a SPEC_ERRORS error
                    (or a replayed error other than answer_lost, or a lost
                    answer for a key that never executed), plus executions
                    of keys no client sent
      errors        the non-2xx endings by label (code or transport kind)
    """

    def __init__(self):
        self.keys = 0
        self.requests = 0
        self.executions = 0
        self.duplicates = 0
        self.mismatched = 0
        self.lost = 0
        self.answer_lost = 0
        self.unexpected = 0
        self.excluded = 0
        self.excluded_dups = 0
        self.errors = collections.Counter()
        self.details = []
        self.lost_keys = []

    def failed(self):
        return self.duplicates > 0 or self.mismatched > 0 or self.unexpected > 0

    def note(self, text):
        if len(self.details) < 40:
            self.details.append(text)

    def line(self):
        errs = ",".join("%s:%d" % kv for kv in sorted(self.errors.items()))
        return ("keys=%d requests=%d executions=%d duplicates=%d mismatched_replays=%d "
                "lost=%d answer_lost=%d unexpected=%d excluded=%d excluded_dups=%d errors=%s"
                % (self.keys, self.requests, self.executions, self.duplicates,
                   self.mismatched, self.lost, self.answer_lost, self.unexpected,
                   self.excluded, self.excluded_dups, errs or "-"))

    def explain(self):
        return self.line() + "\n" + "\n".join(self.details)


def _check_ok_answer(rep, a, execs_by_id):
    """Returns the execution id a 2xx (or cut 2xx) answer carries, or None
    after counting it as mismatched."""
    exec_id = a.header("X-Exec")
    ex = execs_by_id.get(exec_id)
    if ex is None or ex["key"] != a.key:
        rep.mismatched += 1
        rep.note("mismatch: %r carries X-Exec %r, not an execution of its key" % (a, exec_id))
        return None
    want = ex["body"].encode("latin-1")
    good = a.body == want if a.kind == "answer" else want.startswith(a.body)
    if not good:
        rep.mismatched += 1
        rep.note("mismatch: %r body differs from execution %s %r" % (a, exec_id, want))
        return None
    return exec_id


def analyze(attempts, execs, excluded=None):
    """Holds the attempts against the execution log. excluded: {key: reason}
    for keys a fault allows to execute again (Redis restarted empty, their
    owner instance killed): counted apart, their answers still checked
    against their own executions."""
    excluded = excluded or {}
    rep = Report()
    by_key = collections.defaultdict(list)
    for a in attempts:
        by_key[a.key].append(a)
    exec_by_key = collections.defaultdict(list)
    execs_by_id = {}
    for e in execs:
        exec_by_key[e["key"]].append(e)
        execs_by_id[e["exec"]] = e
    rep.keys = len(by_key)
    rep.requests = len(attempts)
    rep.excluded = sum(1 for k in by_key if k in excluded)
    for k, es in exec_by_key.items():
        if k not in by_key:
            rep.unexpected += 1
            rep.note("unexpected: %d execution(s) of key %r that no client sent" % (len(es), k))
    for key, atts in by_key.items():
        atts.sort(key=lambda a: a.t0)
        es = exec_by_key.get(key, [])
        rep.executions += len(es)
        if len(es) > 1:
            if key in excluded:
                rep.excluded_dups += 1
                rep.note("excluded (%s): key %r executed %d times" % (excluded[key], key, len(es)))
            else:
                rep.duplicates += 1
                rep.note("duplicate: key %r executed %d times: %s%s" % (
                    key, len(es), [(e["exec"], e["port"], e["mode"]) for e in es[:4]],
                    " ..." if len(es) > 4 else ""))
        first_id = None
        fresh = collections.Counter()
        got_ok = False
        for a in atts:
            if a.kind in ("answer", "cut") and a.status is not None and 200 <= a.status < 300:
                got_ok = got_ok or a.kind == "answer"
                exec_id = _check_ok_answer(rep, a, execs_by_id)
                if exec_id is None:
                    continue
                if a.kind == "cut":
                    rep.errors["cut"] += 1
                    continue
                if key not in excluded:
                    if first_id is None:
                        first_id = exec_id
                    elif exec_id != first_id:
                        rep.mismatched += 1
                        rep.note("mismatch: %r is execution %s, the key's first answer was %s"
                                 % (a, exec_id, first_id))
                    if not a.replayed:
                        fresh[exec_id] += 1
                        if fresh[exec_id] > 1:
                            rep.mismatched += 1
                            rep.note("mismatch: %r: execution %s answered fresh twice"
                                     % (a, exec_id))
                continue
            if a.kind != "answer":
                rep.errors[a.kind] += 1
                continue
            err = a.spec_error()
            rep.errors[a.code or str(a.status)] += 1
            if err not in SPEC_ERRORS:
                rep.unexpected += 1
                rep.note("unexpected: %r" % a)
            elif a.replayed and err != (502, "upstream_answer_lost"):
                rep.unexpected += 1
                rep.note("unexpected: replayed error %r" % a)
            elif err == (502, "upstream_answer_lost") and not es:
                rep.unexpected += 1
                rep.note("unexpected: %r lost, but the key never executed" % a)
        if key in excluded:
            continue
        if not got_ok:
            rep.lost += 1
            rep.lost_keys.append(key)
            if atts and atts[-1].spec_error() == (502, "upstream_answer_lost"):
                rep.answer_lost += 1
    return rep


def assert_invariant(rep):
    assert not rep.failed(), rep.explain()


def fresh_request_ok(port, key=None, path="/pay", timeout=10):
    """A new covered request on a new connection: executed and answered
    2xx (the instance is alive and serves)."""
    key = key or "fresh-%d-%d" % (os.getpid(), random.getrandbits(32))
    client = HttpClient(timeout)
    try:
        return client.post(port, path, key)
    finally:
        client.close()
