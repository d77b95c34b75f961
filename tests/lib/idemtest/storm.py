"""Many clients at once, and faults injected while they run.

Owns: Bg (one call in a daemon thread); in_threads() (n calls in threads,
joined within a bound); storm() / storm_each() (n clients
released together by a barrier, one connection each); storm_two_bodies()
(one key, two bodies: exactly one execution); run_sessions() (retrying
clients working through keys, attempts.session); inject_when() (a fault
run once the upstream has executed n requests); fault_storm() (both, then
the invariant).
"""

import random
import threading
import time

from .assertions import (assert_error, assert_in_progress, assert_replay_of,
                         wait_until)
from .attempts import AttemptClient, Recorder, session
from .http import BODY, connection, hdrs, request
from .invariant import analyze, assert_invariant


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


def in_threads(fn, n, timeout, what="threads"):
    """Runs fn(i) for i in range(n), each in a daemon thread of its own,
    and joins them all within timeout seconds; fails if one still runs."""
    ts = [threading.Thread(target=fn, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in ts), "%s did not end in %ss" % (what, timeout)


def storm(ports, path, key, n, body=BODY, api_key="k1", timeout=30):
    """n clients, each with its own connection (opened before the barrier),
    released together, client i sending to ports[i % len(ports)]. Returns
    the list of Resp (or exceptions) in client order."""
    return storm_each(ports, n, lambda i: (
        path, hdrs(key if isinstance(key, str) else key(i), api_key), body),
        timeout)


def storm_each(ports, n, request_of, timeout=30):
    """Like storm() but client i POSTs request_of(i) = (path, headers,
    body)."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def client(i):
        port = ports[i % len(ports)]
        conn = connection(port, timeout)
        try:
            conn.connect()
            barrier.wait(timeout)
            path, headers, body = request_of(i)
            results[i] = request(port, "POST", path, headers, body, conn=conn)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            results[i] = e
        finally:
            conn.close()

    in_threads(client, n, timeout + 10, "storm clients")
    return results


def storm_two_bodies(port, upstream, path, key, n=40):
    """n clients, one key, half of them with another body: exactly one
    execution (upstream: procs.Upstream); the other body's clients get 409
    idempotency_key_reuse, the winner's body's clients 409
    request_in_progress or the replay."""
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
    assert upstream.count(key) == 1


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
        client = AttemptClient(policy.attempt_timeout)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    key = queue.pop(0)
                session(client, ports, path, key, policy, rng, rec, sid=i, stop=stop)
        finally:
            client.close()

    in_threads(worker, threads, timeout, "client sessions")
    return rec


def inject_when(up, n_execs, fault, timeout=30):
    """Runs fault() in a thread once the upstream up (procs.ExecUpstream)
    has executed n_execs requests (mid-storm), or timeout seconds have
    passed. Returns the thread and a dict of what happened: reached (the
    count was reached), t0 and t1 (wall clock around the fault) and result
    (what fault returned)."""
    info = {}

    def run():
        info["reached"] = bool(wait_until(lambda: len(up.execs()) >= n_execs,
                                          timeout, 0.05))
        info["t0"] = time.time()
        info["result"] = fault()
        info["t1"] = time.time()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, info


def fault_storm(up, n_execs, fault, jobs, ports, path, policy, threads, timeout,
                join, what, after):
    """run_sessions(jobs, ports, path, policy, threads, timeout) while
    inject_when(up, n_execs, fault) breaks something mid-storm (its thread
    joined within join seconds). Checks that the fault ran once the count
    was reached, that the invariant holds (the report's line is printed
    after what) and that some attempt started after the fault ended
    ("the storm ended before " + after). Returns (attempts, report, info)."""
    t, info = inject_when(up, n_execs, fault)
    rec = run_sessions(jobs, ports, path, policy, threads=threads, timeout=timeout)
    t.join(join)
    assert info.get("reached") and "t1" in info, info
    attempts = rec.snapshot()
    rep = analyze(attempts, up.execs())
    print("%s:" % what, rep.line())
    assert_invariant(rep)
    assert any(a.t0 > info["t1"] for a in attempts), "the storm ended before " + after
    return attempts, rep, info
