"""Store faults mid-storm (docs/requests.md, "Store failure"): Redis frozen
with SIGSTOP then thawed, Redis killed and restarted empty, and a timed-out
acquire whose lock Redis takes after the timeout. Real redis-server, real
idemgate, the execution-logging upstream; the invariant of every case is
idemtest.invariant.analyze's: no key executes twice, every 2xx is its key's one
execution byte for byte, every other answer a documented error, and idemgate
serves a fresh request at the end."""

import os
import signal
import time

from idemtest.attempts import Policy, fresh_request_ok
from idemtest.invariant import analyze, assert_invariant
from idemtest.storm import fault_storm, run_sessions


def two_gates(idemgate, redis, up, lock_seconds=30):
    cfgs = [{"upstream": url, "store": "redis", "redis": {"url": redis.url},
             "idempotency": {"lock_seconds": lock_seconds}} for url in up.urls]
    return [idemgate(c) for c in cfgs]


def check_alive(gates):
    for g in gates:
        assert g.alive(), g.stderr()[-2000:]
        a = fresh_request_ok(g.port)
        assert a.ok() and not a.replayed, a


def test_redis_sigstop_mid_storm(idemgate, redis, execup):
    """Redis frozen for 2.5 s (redis.timeout_ms 1000) while two instances
    serve 150 keys, every third sent by two clients at once: acquires and
    writes time out (503, failed completes), nothing executes twice."""
    up = execup(nports=2)
    gates = two_gates(idemgate, redis, up)
    keys = ["stop-%03d" % i for i in range(150)]
    jobs = [k for i, k in enumerate(keys) for _ in range(2 if i % 3 == 0 else 1)]

    def pause():
        os.kill(redis.proc.pid, signal.SIGSTOP)
        time.sleep(2.5)
        os.kill(redis.proc.pid, signal.SIGCONT)

    fault_storm(up, 20, pause, jobs, [g.port for g in gates], "/pay?ms=150",
                Policy(attempt_timeout=10, budget=15, abandon_noread=0.03), threads=24,
                timeout=75, join=10, what="redis SIGSTOP", after="SIGCONT")
    check_alive(gates)


def test_redis_restarted_empty_mid_storm(idemgate, redis, execup):
    """Redis killed and started again empty while 150 keys are served, one
    client per key: the key in flight still gets its upstream answer (the
    failed store write never turns into a 5xx of ours), a refused one
    executes after the restart; once each, and every key ends with a 2xx."""
    up = execup(nports=2)
    gates = two_gates(idemgate, redis, up)
    keys = ["empty-%03d" % i for i in range(150)]

    def restart():
        redis.kill()
        time.sleep(0.5)
        redis.start()

    _, rep, _ = fault_storm(up, 20, restart, keys, [g.port for g in gates], "/pay?ms=150",
                            Policy(attempt_timeout=10, budget=20), threads=24, timeout=75,
                            join=15, what="redis restarted empty", after="the restart")
    assert rep.lost == 0, rep.explain()
    check_alive(gates)


def test_redis_sigstop_timed_out_acquire_gives_lock_back(idemgate, redis, execup):
    """Requests sent while Redis is frozen get 503 store_unavailable after
    redis.timeout_ms; Redis takes their locks when thawed. docs/requests.md:
    idemgate gives such locks back as soon as the store answers again, so
    the clients' retries execute long before lock_seconds (30) runs out."""
    up = execup()
    g = idemgate({"upstream": up.url, "store": "redis", "redis": {"url": redis.url},
                  "idempotency": {"lock_seconds": 30}})
    keys = ["frozen-%d" % i for i in range(5)]
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        firsts = run_sessions(keys, [g.port], "/pay", Policy(attempt_timeout=10, max_attempts=1),
                              threads=5, timeout=30).snapshot()
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    assert all(a.spec_error() == (503, "store_unavailable") for a in firsts), firsts
    assert up.execs() == []
    # Retries for up to a third of lock_seconds: a lock kept until it expires
    # would answer 409 all along.
    rec = run_sessions(keys, [g.port], "/pay", Policy(attempt_timeout=10, budget=10),
                       threads=5, timeout=40)
    attempts = firsts + rec.snapshot()
    rep = analyze(attempts, up.execs())
    print("timed-out acquire:", rep.line())
    assert_invariant(rep)
    assert rep.lost == 0, rep.explain()
    check_alive([g])
