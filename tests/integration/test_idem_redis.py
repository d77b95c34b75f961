"""Idempotency engine on the Redis store only (docs/requests.md): what is
written to Redis (no raw credential, key layout, prefix, scope secret),
lock renewal, a killed owner, Redis down / restarted / scripts flushed, TTL.
"""

import hashlib
import hmac
import re
import signal
import time

import pytest

from idemtest.assertions import (after_release, assert_error, assert_in_progress,
                                 assert_replay_of, retry_while, wait_until,
                                 wait_upstream_saw)
from idemtest.config import gate_config
from idemtest.http import post
from idemtest.resp import RespClient, call
from idemtest.storm import Bg

SECRET = "sk_live_SECRET123"
KEY_RE = re.compile(rb"^idem:\{([0-9a-f]{64}):(.+)\}$")


@pytest.fixture
def gate(idemgate, upstream, redis):
    def start(idem=None, redis_cfg=None, env=None, **top):
        cfg = gate_config({"store": "redis", "redis": {"url": redis.url}},
                          upstream.url, idem, **top)
        if redis_cfg:
            cfg["redis"].update(redis_cfg)
        return idemgate(cfg, env=env)
    return start


def sha256_hex(s):
    return hashlib.sha256(s.encode()).hexdigest()


def hmac_hex(secret, s):
    return hmac.new(secret.encode(), s.encode(), hashlib.sha256).hexdigest()


def all_bytes(redis):
    """Every key name and every stored byte, per key."""
    with RespClient(redis.port) as c:
        return {k: c.contents(k) for k in c.keys()}


def assert_no_secret(redis, needles):
    contents = all_bytes(redis)
    assert contents, "nothing was written to Redis"
    for k, (_t, parts) in contents.items():
        for p in parts:
            for n in needles:
                assert n not in p, "credential %r found under Redis key %r: %r" % (
                    n, k, p[:200])
    return contents


def completed_pttl(redis, key, limit_ms):
    """PTTL of key once the record is completed: the response can reach the
    client a moment before the record is written (the lock's own PTTL is
    lock_seconds), so poll until it drops to the ttl, bounded."""
    last = [None]

    def ok():
        last[0] = pttl(redis, key)
        return 0 < last[0] <= limit_ms
    wait_until(ok, 5)
    return last[0]


def pttl(redis, key):
    return call(redis.port, "PTTL", key)


def test_raw_credential_never_in_redis(gate, upstream, redis):
    g = gate()
    needles = [SECRET.encode(), b"SECRET123"]
    # in progress
    first = Bg(post, g.port, "/count?ms=1500", "sec1", api_key=SECRET)
    wait_upstream_saw(upstream, "sec1")
    assert_no_secret(redis, needles)
    assert first.result().status == 201
    # completed (/count, whose response does not echo the credential)
    r = post(g.port, "/count", "sec2", api_key=SECRET)
    assert r.status == 201
    time.sleep(0.2)
    contents = assert_no_secret(redis, needles)
    assert len(contents) == 2, contents.keys()
    # X-API-Key credentials too
    r = post(g.port, "/count", "sec3", api_key=None, extra=[("X-API-Key", SECRET)])
    assert r.status == 201
    time.sleep(0.2)
    assert_no_secret(redis, needles)
    # nor in the logs
    assert "SECRET123" not in g.stderr()


def test_redis_key_layout(gate, upstream, redis):
    g = gate()
    r = post(g.port, "/count", "order-42", api_key=SECRET)
    assert r.status == 201
    key = wait_until(lambda: rc_keys(redis), 5)[0]
    m = KEY_RE.match(key)
    assert m, key
    assert m.group(2) == b"order-42"
    # scope = hex SHA-256 of the credential (the Authorization value)
    assert m.group(1).decode() == sha256_hex("Bearer " + SECRET), key
    ttl = pttl(redis, key)
    assert 0 < ttl <= 86400 * 1000, ttl


def rc_keys(redis):
    with RespClient(redis.port) as c:
        return c.keys()


def test_redis_key_layout_x_api_key(gate, upstream, redis):
    g = gate()
    r = post(g.port, "/count", "xk", api_key=None, extra=[("X-API-Key", "abc")])
    assert r.status == 201
    key = wait_until(lambda: rc_keys(redis), 5)[0]
    m = KEY_RE.match(key)
    assert m, key
    assert m.group(1).decode() == sha256_hex("abc"), key


def test_quoted_key_stored_unquoted(gate, upstream, redis):
    g = gate()
    assert post(g.port, "/count", '"q1"').status == 201
    key = wait_until(lambda: rc_keys(redis), 5)[0]
    m = KEY_RE.match(key)
    assert m and m.group(2) == b"q1", key


def test_key_prefix_honoured(gate, upstream, redis):
    g = gate(redis_cfg={"key_prefix": "myapp:idem:"})
    r1 = post(g.port, "/count", "pf1")
    assert r1.status == 201
    key = wait_until(lambda: rc_keys(redis), 5)[0]
    assert re.match(rb"^myapp:idem:\{[0-9a-f]{64}:pf1\}$", key), key
    r2 = after_release(lambda: post(g.port, "/count", "pf1"))
    assert_replay_of(r2, r1)
    assert upstream.count("pf1") == 1


def test_two_prefixes_do_not_share(idemgate, upstream, redis):
    a = idemgate(gate_config({"store": "redis", "redis": {"url": redis.url,
                                                          "key_prefix": "a:"}},
                             upstream.url))
    b = idemgate(gate_config({"store": "redis", "redis": {"url": redis.url,
                                                          "key_prefix": "b:"}},
                             upstream.url))
    assert post(a.port, "/count", "tp").status == 201
    r = post(b.port, "/count", "tp")
    assert r.status == 201 and not r.replayed, r
    assert upstream.count("tp") == 2


def test_scope_secret_changes_stored_scope(gate, upstream, redis):
    g = gate(idem={"scope_secret": "pepper-1"})
    assert post(g.port, "/count", "ss1", api_key=SECRET).status == 201
    key = wait_until(lambda: rc_keys(redis), 5)[0]
    m = KEY_RE.match(key)
    assert m, key
    scope = m.group(1).decode()
    assert scope != sha256_hex("Bearer " + SECRET)
    assert scope == hmac_hex("pepper-1", "Bearer " + SECRET), key


def test_scope_secret_from_env(gate, upstream, redis):
    g = gate(env={"IDEMGATE_SCOPE_SECRET": "pepper-2"})
    assert post(g.port, "/count", "ss2", api_key=SECRET).status == 201
    key = wait_until(lambda: rc_keys(redis), 5)[0]
    m = KEY_RE.match(key)
    assert m and m.group(1).decode() == hmac_hex("pepper-2", "Bearer " + SECRET), key


def test_scope_secret_change_is_a_new_scope(idemgate, upstream, redis):
    base = {"store": "redis", "redis": {"url": redis.url}}
    a = idemgate(gate_config(base, upstream.url, {"scope_secret": "one"}))
    b = idemgate(gate_config(base, upstream.url, {"scope_secret": "two"}))
    assert post(a.port, "/count", "ss3").status == 201
    r = post(b.port, "/count", "ss3")
    assert r.status == 201 and not r.replayed, r
    assert upstream.count("ss3") == 2


def test_lock_is_renewed(gate, upstream, redis):
    # timeout_ms must stay below 2/3 of the lock (docs/configuration.md)
    g = gate(idem={"lock_seconds": 1}, redis_cfg={"timeout_ms": 500})
    first = Bg(post, g.port, "/count?ms=3000", "lr1")
    wait_upstream_saw(upstream, "lr1")
    key = rc_keys(redis)[0]
    assert 0 < pttl(redis, key) <= 1000
    time.sleep(2.0)  # twice lock_seconds: only renewal keeps the lock
    assert_in_progress(post(g.port, "/count?ms=3000", "lr1"))
    assert 0 < pttl(redis, key) <= 1000
    r1 = first.result()
    assert r1.status == 201 and not r1.replayed, r1
    r2 = retry_while(lambda: post(g.port, "/count?ms=3000", "lr1"),
                     lambda r: r.status == 409, 5, 0.05)
    assert_replay_of(r2, r1)
    assert upstream.count("lr1") == 1


def test_owner_killed_lock_expires(idemgate, upstream, redis):
    cfg = gate_config({"store": "redis", "redis": {"url": redis.url}},
                      upstream.url, {"lock_seconds": 2})
    a = idemgate(cfg)
    first = Bg(post, a.port, "/count?ms=5000", "kill1")
    wait_upstream_saw(upstream, "kill1")
    a.kill()  # SIGKILL: no release, no renewal any more
    with pytest.raises(Exception):
        first.result()
    b = idemgate(cfg)
    assert_in_progress(post(b.port, "/count?ms=5000", "kill1"))
    r = after_release(lambda: post(b.port, "/count?ms=5000", "kill1"), timeout=10,
                      interval=0.2, must="lock never expired")
    assert r.status == 201 and not r.replayed, r
    assert r.json()["n"] == 2
    assert upstream.count("kill1") == 2


def test_redis_down_fail_closed(gate, upstream, redis):
    g = gate()  # failure_mode closed is the default
    assert post(g.port, "/count", "rd0").status == 201
    redis.kill()
    r = post(g.port, "/count", "rd1")
    assert_error(r, 503, "store_unavailable")
    assert r.header("Retry-After") == "1", r
    r = post(g.port, "/count", "rd0")
    assert_error(r, 503, "store_unavailable")
    assert upstream.count("rd1") == 0
    assert upstream.count("rd0") == 1
    assert g.alive()


def test_redis_down_fail_closed_explicit_and_timeout_ms(gate, upstream, redis):
    g = gate(redis_cfg={"failure_mode": "closed", "timeout_ms": 200})
    redis.kill()
    r = post(g.port, "/count", "rd2", timeout=10)
    assert_error(r, 503, "store_unavailable")
    assert r.header("Retry-After") == "1", r
    assert upstream.stats()["total"] == 0


def test_redis_down_passthrough_unaffected(gate, upstream, redis):
    g = gate()
    redis.kill()
    r = post(g.port, "/count", None)
    assert r.status == 201, r
    r = post(g.port, "/count", "get1", method="GET", body=b"")
    assert r.status == 201, r


def test_redis_down_fail_open(gate, upstream, redis):
    g = gate(redis_cfg={"failure_mode": "open"})
    redis.kill()
    r1 = post(g.port, "/count", "fo1")
    assert r1.status == 201 and not r1.replayed, r1
    r2 = post(g.port, "/count", "fo1")
    assert r2.status == 201 and not r2.replayed, r2
    assert upstream.count("fo1") == 2


def test_redis_down_then_restarted(gate, upstream, redis):
    g = gate()
    r0 = post(g.port, "/count", "rs0")
    assert r0.status == 201
    redis.kill()
    assert_error(post(g.port, "/count", "rs1"), 503, "store_unavailable")
    redis.restart()
    r = retry_while(lambda: post(g.port, "/count", "rs1"), lambda r: r.status == 503,
                    10, 0.2, must="idemgate never reconnected")
    assert r.status == 201 and not r.replayed, r
    r2 = after_release(lambda: post(g.port, "/count", "rs1"))
    assert_replay_of(r2, r)
    assert upstream.count("rs1") == 1
    assert g.alive()


def test_redis_restart_while_idle_keepalive(gate, upstream, redis):
    """Restart twice; each time the proxy comes back without a restart."""
    g = gate()
    for i in range(2):
        redis.restart()
        key = "rr%d" % i
        ok = wait_until(lambda: post(g.port, "/count", key).status != 503, 10,
                        interval=0.2)
        assert ok, "no recovery after restart %d" % i
        assert upstream.count(key) == 1


def test_script_flush_reloads(gate, upstream, redis):
    g = gate()
    r0 = post(g.port, "/count", "sf0")
    assert r0.status == 201
    assert call(redis.port, "SCRIPT", "FLUSH") == b"OK"
    r1 = post(g.port, "/count", "sf1")
    assert r1.status == 201 and not r1.replayed, r1
    r2 = after_release(lambda: post(g.port, "/count", "sf1"))
    assert_replay_of(r2, r1)
    # records written before the flush still replay
    assert_replay_of(post(g.port, "/count", "sf0"), r0)
    # flush again, then the in-progress / complete path
    call(redis.port, "SCRIPT", "FLUSH")
    first = Bg(post, g.port, "/count?ms=1000", "sf2")
    wait_upstream_saw(upstream, "sf2")
    assert_in_progress(post(g.port, "/count?ms=1000", "sf2"))
    assert first.result().status == 201
    assert upstream.count("sf1") == 1
    assert upstream.count("sf2") == 1


def _expect_expiry(g, upstream, key):
    r1 = post(g.port, "/count", key)
    assert r1.status == 201
    assert_replay_of(after_release(lambda: post(g.port, "/count", key)), r1)
    time.sleep(2.5)
    r = retry_while(lambda: post(g.port, "/count", key), lambda r: r.replayed, 5, 0.2)
    assert r.status == 201 and not r.replayed, r
    assert r.json()["n"] == 2
    assert upstream.count(key) == 2


def test_ttl_expiry(gate, upstream, redis):
    g = gate(idem={"ttl_seconds": 2})
    r1 = post(g.port, "/count", "ttl0")
    key = wait_until(lambda: rc_keys(redis), 5)[0]
    ttl = completed_pttl(redis, key, 2000)
    assert 0 < ttl <= 2000, ttl
    assert_replay_of(after_release(lambda: post(g.port, "/count", "ttl0")), r1)
    _expect_expiry(g, upstream, "ttl1")


def test_ttl_env_overrides_file(gate, upstream, redis):
    g = gate(idem={"ttl_seconds": 86400}, env={"IDEMPOTENCY_TTL_SECONDS": "2"})
    post(g.port, "/count", "te0")
    key = wait_until(lambda: rc_keys(redis), 5)[0]
    ttl = completed_pttl(redis, key, 2000)
    assert 0 < ttl <= 2000, ttl
    _expect_expiry(g, upstream, "te1")


def test_redis_flushall_forgets(gate, upstream, redis):
    """The store is the only memory: after FLUSHALL the key executes again."""
    g = gate()
    assert post(g.port, "/count", "fa").status == 201
    call(redis.port, "FLUSHALL")
    r = post(g.port, "/count", "fa")
    assert r.status == 201 and not r.replayed, r
    assert upstream.count("fa") == 2


def test_sigterm_lets_inflight_complete(gate, upstream, redis):
    """SIGTERM while a request runs: it finishes, its record is written."""
    g = gate()
    first = Bg(post, g.port, "/count?ms=1000", "term1")
    wait_upstream_saw(upstream, "term1")
    g.proc.send_signal(signal.SIGTERM)
    r1 = first.result()
    assert r1.status == 201, r1
    assert g.proc.wait(15) == 0
    keys = rc_keys(redis)
    assert len(keys) == 1, keys
    # a new instance replays it
    g2 = gate()
    assert_replay_of(post(g2.port, "/count?ms=1000", "term1"), r1)
    assert upstream.count("term1") == 1
