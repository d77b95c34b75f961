"""An upstream that executed, then broke its answer (docs/requests.md, the
*lost* row): a body cut short of its Content-Length, and heads idemgate
refuses: "Content-Length: 2, 2", "Transfer-Encoding: gzip" without chunked,
status 600. The key is kept as lost: the client gets what arrived (a cut
body ends the connection) or 502 upstream_answer_lost, every retry gets 502
upstream_answer_lost with Idempotent-Replayed: true, and the key never
executes again. Six keys per case, two clients each, retrying."""

import pytest

from idemtest.attempts import Policy, fresh_request_ok
from idemtest.invariant import analyze, assert_invariant
from idemtest.storm import run_sessions

MODES = ["cut", "badcl", "badte", "s600"]


@pytest.mark.parametrize("mode", MODES)
def test_upstream_broken_answer_is_lost(idemgate, redis, execup, mode):
    up = execup()
    g = idemgate({"upstream": up.url, "store": "redis", "redis": {"url": redis.url}})
    keys = ["%s-%d" % (mode, i) for i in range(6)]
    rec = run_sessions([k for k in keys for _ in range(2)], [g.port], "/" + mode,
                       Policy(attempt_timeout=10, budget=10), threads=12, timeout=45)
    attempts = rec.snapshot()
    rep = analyze(attempts, up.execs())
    print("upstream %s:" % mode, rep.line())
    assert_invariant(rep)
    assert rep.executions == len(keys), rep.explain()
    # Nothing the upstream sent was a valid answer: no client got a 2xx.
    assert not [a for a in attempts if a.ok()], [a for a in attempts if a.ok()]
    for a in attempts:
        if a.kind == "cut":
            assert mode == "cut" and a.status == 201 and not a.replayed, a
        elif a.kind == "answer":
            assert a.spec_error() in {(409, "request_in_progress"),
                                      (502, "upstream_answer_lost")}, a
        else:
            pytest.fail("unexpected ending %r" % a)
    for k in keys:
        mine = [a for a in attempts if a.key == k]
        ends = {}
        for a in sorted(mine, key=lambda a: a.t0):
            ends[a.session] = a
        for a in ends.values():
            assert a.spec_error() == (502, "upstream_answer_lost") and a.replayed, (k, mine)
        # the execution's own answer was never replayed as a lost one
        firsts = [a for a in mine if a.kind == "cut" or
                  (a.spec_error() == (502, "upstream_answer_lost") and not a.replayed)]
        assert len(firsts) == 1, (k, mine)
    assert g.alive()
    assert fresh_request_ok(g.port).ok()
