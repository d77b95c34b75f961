"""The memory store end to end: memory.max_bytes bounds it (oldest completed
records evicted first, the process stays up and its RSS bounded; when only
in-progress locks are left, 503 store_unavailable), one credential cannot
push another's records out (memory.max_scope_bytes, the largest scope loses
its records first, idemgate_store_evictions_total), plus docs/requests.md
cases that were covered on Redis only, run here on both stores from the
same code (lock renewal under a slow upstream; one key, two bodies, many
concurrent clients).
"""

import os
import time

from idemtest.assertions import (after_release, assert_error, assert_in_progress,
                                 assert_replay_of, wait_upstream_saw)
from idemtest.config import gate_config
from idemtest.http import BODY, connection, hdrs, metrics, post, request
from idemtest.procs import free_port, rss_kib
from idemtest.storm import Bg, storm_each, storm_two_bodies

MIB = 1024 * 1024
SMALL = {"store": "memory", "memory": {"max_bytes": MIB}}


def big(port, key, n=65536, conn=None):
    return request(port, "POST", "/big?bytes=%d" % n, hdrs(key), BODY, conn=conn)


# ---------------------------------------------------------------------------
# memory.max_bytes
# ---------------------------------------------------------------------------

def test_small_store_evicts_oldest_and_stays_bounded(idemgate, upstream):
    # Under AddressSanitizer (CI's second pass), freed memory would sit in
    # ASan's quarantine (256 MiB by default) and count as RSS: keep it small.
    asan = os.environ.get("ASAN_OPTIONS", "")
    env = {"ASAN_OPTIONS": (asan + ":" if asan else "") + "quarantine_size_mb=1"}
    g = idemgate(gate_config(SMALL, upstream.url, workers=2), env=env)
    n = 1000  # 1000 x 64 KiB records: 64 MiB through a 1 MiB store
    conn = connection(g.port)
    try:
        for i in range(n):
            r = big(g.port, "ev-%04d" % i, conn=conn)
            assert r.status == 200 and len(r.body) == 65536, r
            assert r.header("Idempotent-Replayed") is None, r
    finally:
        conn.close()
    assert g.alive()
    assert rss_kib(g.proc.pid) < 64 * 1024, rss_kib(g.proc.pid)
    # the newest records are kept: a retry replays them
    for i in range(n - 4, n):
        key = "ev-%04d" % i
        r = after_release(lambda: big(g.port, key))
        assert r.status == 200 and r.replayed, r
        assert len(r.body) == 65536
        assert upstream.count(key) == 1
    # the oldest were evicted: they execute again
    for i in range(4):
        key = "ev-%04d" % i
        r = big(g.port, key)
        assert r.status == 200 and not r.replayed, r
        assert upstream.count(key) == 2
    assert upstream.stats()["total"] == n + 4
    assert g.alive()
    assert any("evicting the oldest completed records" in line.get("msg", "")
               for line in g.log_lines())


def test_full_of_locks_is_503(idemgate, upstream):
    """Locks are never evicted: once in-progress locks fill the store, new
    covered requests get 503 store_unavailable and reach nothing."""
    g = idemgate(gate_config(SMALL, upstream.url, {"key_max_length": 8192},
                             workers=2))
    n = 160  # each lock charged > 8 KiB: at most ~128 fit in 1 MiB
    results = storm_each([g.port], n, lambda i: (
        "/count?ms=1500", hdrs(("%04d" % i) + "k" * 8000), BODY))
    assert not [r for r in results if isinstance(r, BaseException)], results
    ok = [r for r in results if r.status == 201]
    full = [r for r in results if r.status == 503]
    assert len(ok) + len(full) == n, [r for r in results
                                      if r.status not in (201, 503)][:3]
    assert ok and full, (len(ok), len(full))
    for r in full:
        assert_error(r, 503, "store_unavailable")
        assert r.header("Retry-After") == "1", r
    assert upstream.stats()["total"] == len(ok)
    assert g.alive()
    # the store still answers (short keys fit again once records can go)
    r = post(g.port, "/count", "after-full")
    assert r.status in (201, 503), r


# ---------------------------------------------------------------------------
# docs/requests.md: one scope never pushes another out
# ---------------------------------------------------------------------------

def scoped_big(port, key, credential, n):
    return request(port, "POST", "/big?bytes=%d" % n, hdrs(key, credential), BODY)


def test_one_credential_cannot_evict_another(idemgate, upstream):
    """The issue's reproduction: a 1 MiB store, the victim's record, then
    four 300 KB answers under another credential. The attacker's own oldest
    record goes, never the victim's: its retry replays."""
    admin = free_port()
    g = idemgate(gate_config(SMALL, upstream.url,
                             admin={"listen": "127.0.0.1:%d" % admin}))
    first = scoped_big(g.port, "victim-1", "VICTIM", 1000)
    assert first.status == 200 and not first.replayed, first
    for i in range(4):
        r = after_release(lambda: scoped_big(g.port, "attacker-%d" % i,
                                             "ATTACKER", 300 * 1000))
        assert r.status == 200 and not r.replayed, r
    r = after_release(lambda: scoped_big(g.port, "victim-1", "VICTIM", 1000))
    assert r.status == 200 and r.replayed, r
    assert_replay_of(r, first)
    assert upstream.count("victim-1") == 1
    # the attacker paid with its own oldest record
    r = scoped_big(g.port, "attacker-0", "ATTACKER", 300 * 1000)
    assert r.status == 200 and not r.replayed, r
    assert upstream.count("attacker-0") == 2
    m = metrics(admin)
    assert m["idemgate_store_evictions_total"] >= 1, m
    assert m["idemgate_memory_store_bytes"] <= MIB
    assert m["idemgate_memory_store_scopes"] == 2
    assert g.alive()


def test_scope_cap_evicts_own_oldest(idemgate, upstream):
    """memory.max_scope_bytes: past it a scope loses its own oldest records,
    although the store as a whole has room."""
    admin = free_port()
    g = idemgate(gate_config({"store": "memory",
                              "memory": {"max_bytes": 8 * MIB,
                                         "max_scope_bytes": 256 * 1024}},
                             upstream.url,
                             admin={"listen": "127.0.0.1:%d" % admin}))
    other = scoped_big(g.port, "other-1", "OTHER", 1000)
    assert other.status == 200, other
    for i in range(6):  # 6 x 64 KiB: more than the 256 KiB of one scope
        r = after_release(lambda: scoped_big(g.port, "cap-%d" % i, "CAPPED",
                                             65536))
        assert r.status == 200 and not r.replayed, r
    m = metrics(admin)
    assert m["idemgate_store_evictions_total"] >= 2, m
    assert m["idemgate_memory_store_max_scope_bytes"] == 256 * 1024
    assert m["idemgate_memory_store_bytes"] < MIB  # far from max_bytes
    # the newest of the capped scope are kept, its oldest executes again
    r = after_release(lambda: scoped_big(g.port, "cap-5", "CAPPED", 65536))
    assert r.status == 200 and r.replayed, r
    r = scoped_big(g.port, "cap-0", "CAPPED", 65536)
    assert r.status == 200 and not r.replayed, r
    assert upstream.count("cap-0") == 2
    # and the other scope was never touched
    r = after_release(lambda: scoped_big(g.port, "other-1", "OTHER", 1000))
    assert r.status == 200 and r.replayed, r
    assert upstream.count("other-1") == 1


# ---------------------------------------------------------------------------
# docs/requests.md on both stores
# ---------------------------------------------------------------------------

def test_lock_renewed_while_upstream_works(idemgate, upstream, store_cfg):
    cfg = gate_config(store_cfg, upstream.url, {"lock_seconds": 1})
    if cfg["store"] == "redis":  # timeout_ms below 2/3 of the lock (docs/configuration.md)
        cfg["redis"]["timeout_ms"] = 500
    g = idemgate(cfg)
    first = Bg(post, g.port, "/count?ms=3000", "renew1")
    wait_upstream_saw(upstream, "renew1")
    time.sleep(2.0)  # twice lock_seconds: only renewal keeps the lock
    assert_in_progress(post(g.port, "/count?ms=3000", "renew1"))
    r1 = first.result()
    assert r1.status == 201 and not r1.replayed, r1
    r2 = after_release(lambda: post(g.port, "/count?ms=3000", "renew1"))
    assert_replay_of(r2, r1)
    assert upstream.count("renew1") == 1


def test_storm_one_key_two_bodies(idemgate, upstream, store_cfg):
    g = idemgate(gate_config(store_cfg, upstream.url, workers=2))
    storm_two_bodies(g.port, upstream, "/count?ms=300", "bodies")
