"""Processes killed mid-request: the upstream SIGKILLed in the middle of its
answers (after the head: the answer is lost, docs/requests.md), the upstream
SIGKILLed before its head with unknown_outcome "keep", and one of two
idemgate instances SIGKILLed mid-storm and started again. Invariant as in
test_store_faults.py (idemtest.invariant.analyze)."""

import time

from idemtest.assertions import wait_until
from idemtest.attempts import Policy, fresh_request_ok
from idemtest.invariant import analyze, assert_invariant
from idemtest.procs import free_port
from idemtest.storm import Bg, fault_storm, run_sessions


def run_bg(jobs, ports, path, policy, threads, timeout):
    return Bg(run_sessions, jobs, ports, path, policy, threads=threads, timeout=timeout)


def lost_replayed(attempts, key):
    """The last answer of every session of key is 502 upstream_answer_lost,
    replayed."""
    ends = {}
    for a in sorted(attempts, key=lambda a: a.t0):
        if a.key == key:
            ends[a.session] = a
    return [a for a in ends.values()
            if not (a.spec_error() == (502, "upstream_answer_lost") and a.replayed)]


def test_upstream_killed_mid_response(idemgate, redis, execup):
    """8 keys, two clients each; the upstream sends each answer's head and
    half its body, then is SIGKILLed (and started again). The head said 201:
    the upstream executed, its answer is lost. The clients get the cut
    answers (the connection ends), every retry gets 502
    upstream_answer_lost replayed, and nothing executes again."""
    up = execup()
    g = idemgate({"upstream": up.url, "store": "redis", "redis": {"url": redis.url}})
    keys = ["drip-%d" % i for i in range(8)]
    bg = run_bg([k for k in keys for _ in range(2)], [g.port], "/drip",
                Policy(attempt_timeout=10, budget=12), threads=16, timeout=45)
    assert wait_until(lambda: len(up.heads()) >= len(keys), 20, 0.05), up.events()
    up.kill()
    up.start(drip=False)
    attempts = bg.result(60).snapshot()
    rep = analyze(attempts, up.execs())
    print("upstream killed mid-response:", rep.line())
    assert_invariant(rep)
    assert not [a for a in attempts if a.ok()], "a cut answer became a 2xx"
    for k in keys:
        assert not lost_replayed(attempts, k), (k, lost_replayed(attempts, k))
    assert g.alive()
    assert fresh_request_ok(g.port).ok()


def test_upstream_killed_before_head_unknown_outcome_keep(idemgate, redis, execup):
    """unknown_outcome "keep": requests sent to an upstream that is SIGKILLed
    before it answers are kept as lost. The clients get 502
    upstream_unavailable; every retry gets 502 upstream_answer_lost
    replayed; nothing executes again."""
    up = execup()
    g = idemgate({"upstream": up.url, "store": "redis", "redis": {"url": redis.url},
                  "idempotency": {"unknown_outcome": "keep"}})
    keys = ["nohead-%d" % i for i in range(8)]
    bg = run_bg(keys, [g.port], "/pay?ms=30000", Policy(attempt_timeout=40, budget=12),
                threads=8, timeout=60)
    assert wait_until(lambda: len(up.execs()) >= len(keys), 20, 0.05), up.events()
    up.kill()
    up.start()
    attempts = bg.result(70).snapshot()
    rep = analyze(attempts, up.execs())
    print("upstream killed before its head (keep):", rep.line())
    assert_invariant(rep)
    for k in keys:
        assert not lost_replayed(attempts, k), (k, lost_replayed(attempts, k))
    assert fresh_request_ok(g.port).ok()


def test_idemgate_sigkilled_mid_storm_and_restarted(idemgate, redis, execup):
    """Two instances on one Redis serve 150 keys (every fourth sent by two
    clients at once, some clients leave without reading); instance A is
    SIGKILLed mid-storm and started again on its port. Its in-flight keys
    stay locked by a dead owner (409 until lock_seconds, longer than the
    clients try), nothing executes twice, and both instances serve after."""
    up = execup(nports=2)
    cfgs = [{"upstream": url, "store": "redis", "redis": {"url": redis.url},
             "listen": "127.0.0.1:%d" % free_port()} for url in up.urls]
    gates = [idemgate(c) for c in cfgs]
    keys = ["kill-%03d" % i for i in range(150)]
    jobs = [k for i, k in enumerate(keys) for _ in range(2 if i % 4 == 0 else 1)]

    def kill_and_restart():
        gates[0].kill()
        time.sleep(0.5)
        return idemgate(cfgs[0])

    attempts, _, info = fault_storm(
        up, 30, kill_and_restart, jobs, [g.port for g in gates], "/pay?ms=200",
        Policy(attempt_timeout=10, budget=12, abandon_noread=0.03), threads=24,
        timeout=75, join=15, what="idemgate SIGKILLed", after="the restart")
    assert any(a.kind == "disconnect" and a.port == gates[0].port for a in attempts), \
        "no request was cut by the kill"
    for g in (info["result"], gates[1]):
        assert g.alive()
        assert fresh_request_ok(g.port).ok()

