"""The Redis store against real redis-server processes started with the
settings each case needs (docs/configuration.md, docs/requests.md): a timed-out acquire gives
its lock back, ACL users and passwords (redis://user:pass@, redis://:pass@,
sentinels too), databases above 15, and the warning about a
maxmemory-policy that may evict keys. Every process is private to its test
(free 127.0.0.1 ports) and stopped at teardown; every wait is bounded."""

import time

import pytest

from idemtest.assertions import after_release, assert_error, first_answer, wait_until
from idemtest.config import gate_config
from idemtest.http import post
from idemtest.procs import free_port
from idemtest.resp import RedisError, RespClient, call


def gate_on(idemgate, upstream, redis_cfg, idem=None, **top):
    cfg = gate_config({"store": "redis", "redis": redis_cfg}, upstream.url,
                      idem, **top)
    return idemgate(cfg)


def executes_and_replays(g, upstream, key):
    r1 = first_answer(g.port, key)
    assert r1.status == 201 and r1.header("X-Exec") == "1", r1
    r2 = after_release(lambda: post(g.port, "/count", key))
    assert r2.status == 201 and r2.replayed, r2
    assert upstream.count(key) == 1


# -- a timed-out acquire gives its lock back (docs/requests.md) ----------------


def start_debug_sleep(port, seconds):
    """Sends DEBUG SLEEP on a connection of its own; returns the RespClient
    (read OK from it once Redis answers again)."""
    c = RespClient(port, timeout=10)
    c.send("DEBUG", "SLEEP", seconds)
    # Redis reads it within its next event-loop turn; a PING sent after it
    # on this connection would only be answered after the sleep.
    time.sleep(0.1)
    return c


def test_timed_out_acquire_gives_its_lock_back(idemgate, upstream, redis_servers):
    port = free_port()
    redis_servers.start(port, ["--enable-debug-command", "local"])
    g = gate_on(idemgate, upstream,
                {"url": "redis://127.0.0.1:%d/0" % port, "timeout_ms": 1000},
                {"lock_seconds": 30})
    assert first_answer(g.port, "warm").status == 201
    sleeper = start_debug_sleep(port, 2)
    r = post(g.port, "/count", "gb1")
    assert_error(r, 503, "store_unavailable")
    with sleeper:
        assert sleeper.reply() == b"OK", "DEBUG SLEEP did not answer"
    # Redis ran the acquire after its sleep; the lock must be given back
    # long before lock_seconds (30 s): poll a bounded while, well below it.
    deadline = time.monotonic() + 15
    seen = []
    while True:
        r = post(g.port, "/count", "gb1")
        seen.append(r.status)
        if r.status == 201 or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    assert r.status == 201 and not r.replayed, (r, seen)
    assert upstream.count("gb1") == 1
    assert any("gave back" in (ln.get("msg") or "") for ln in g.log_lines()), \
        g.stderr()


# -- URLs: ACL user, password, database (docs/configuration.md) ---------------------

ACL_USER = ["--user", "idem", "on", ">s3cret w", "~*", "&*", "+@all"]


def client_users(port, password):
    """The user name of every client connection but the asking one."""
    out = call(port, "CLIENT", "LIST", password=password).decode()
    users = []
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("cmd") != "client|list":
            users.append(fields.get("user"))
    return users


def test_acl_user_in_url(idemgate, upstream, redis_servers):
    port = free_port()
    # the default user has another password: only AUTH idem <pass> works
    redis_servers.start(port, ["--requirepass", "defaultpw"] + ACL_USER,
                        password="defaultpw")
    g = gate_on(idemgate, upstream,
                {"url": "redis://idem:s3cret%%20w@127.0.0.1:%d/0" % port})
    executes_and_replays(g, upstream, "acl1")
    assert client_users(port, "defaultpw") == ["idem"], \
        client_users(port, "defaultpw")


def test_password_of_the_default_user(idemgate, upstream, redis_servers):
    port = free_port()
    redis_servers.start(port, ["--requirepass", "pw:1"], password="pw:1")
    g = gate_on(idemgate, upstream,
                {"url": "redis://:pw%%3A1@127.0.0.1:%d/0" % port})
    executes_and_replays(g, upstream, "pw1")
    assert client_users(port, "pw:1") == ["default"]


def test_database_above_15(idemgate, upstream, redis_servers):
    port = free_port()
    redis_servers.start(port, ["--databases", "32"])
    g = gate_on(idemgate, upstream, {"url": "redis://127.0.0.1:%d/20" % port})
    executes_and_replays(g, upstream, "db20")
    assert call(port, "DBSIZE", db=20) == 1
    assert call(port, "DBSIZE", db=0) == 0


def test_sentinel_with_acl_user(idemgate, upstream, redis_servers):
    mp = free_port()
    redis_servers.start(mp, ["--requirepass", "defaultpw"] + ACL_USER,
                        password="defaultpw")
    # the sentinel asks nothing without the same user and password
    sp = redis_servers.start_sentinel(mp,
                                      "requirepass sentinelpw\n"
                                      "user idem on \">s3cret w\" +@all\n"
                                      "sentinel auth-user m idem\n"
                                      "sentinel auth-pass m \"s3cret w\"\n",
                                      user="idem", password="s3cret w")
    with pytest.raises(RedisError, match="NOAUTH"):
        call(sp, "SENTINEL", "get-master-addr-by-name", "m")
    g = gate_on(idemgate, upstream,
                {"mode": "sentinel", "master_name": "m",
                 "url": "redis://idem:s3cret%20w@127.0.0.1:1/0",
                 "nodes": ["127.0.0.1:%d" % sp]})
    executes_and_replays(g, upstream, "sacl1")
    assert client_users(mp, "defaultpw").count("idem") >= 1


def test_sentinel_with_requirepass(idemgate, upstream, redis_servers):
    mp = free_port()
    redis_servers.start(mp, ["--requirepass", "pw"], password="pw")
    sp = redis_servers.start_sentinel(mp, "requirepass pw\nsentinel auth-pass m pw\n",
                                      password="pw")
    g = gate_on(idemgate, upstream,
                {"mode": "sentinel", "master_name": "m",
                 "url": "redis://:pw@127.0.0.1:1/0",
                 "nodes": ["127.0.0.1:%d" % sp]})
    executes_and_replays(g, upstream, "spw1")


# -- maxmemory-policy (docs/configuration.md) --------------------------------------


def stat_calls(port, command, field="calls", user=None, password=None):
    """A commandstats counter of command ("config|get") on port."""
    out = call(port, "INFO", "commandstats", user=user, password=password).decode()
    for line in out.splitlines():
        if line.startswith("cmdstat_%s:" % command):
            fields = dict(f.split("=", 1)
                          for f in line.split(":", 1)[1].split(","))
            return int(fields.get(field, 0))
    return 0


def policy_warnings(g):
    return [ln for ln in g.log_lines() if ln.get("level") == "warn" and
            "maxmemory-policy" in (ln.get("msg") or "")]


def kill_clients_and_wait(port, command, field, before, n, **auth):
    """Closes every client connection (idemgate reconnects by itself) and
    waits until the n workers asked again."""
    call(port, "CLIENT", "KILL", "TYPE", "normal", **auth)
    ok = wait_until(lambda: stat_calls(port, command, field, **auth) >= before + n,
                    timeout=15, interval=0.05)
    assert ok, "the workers did not ask again after a reconnect"


def test_evicting_policy_warned_once(idemgate, upstream, redis_servers):
    port = free_port()
    redis_servers.start(port, ["--maxmemory-policy", "allkeys-lru"])
    g = gate_on(idemgate, upstream, {"url": "redis://127.0.0.1:%d/0" % port},
                workers=2)
    assert wait_until(lambda: stat_calls(port, "config|get") >= 2, timeout=10), \
        "the two workers never read the policy"
    assert wait_until(lambda: policy_warnings(g), timeout=10), g.stderr()
    kill_clients_and_wait(port, "config|get", "calls", 2, 2)
    assert first_answer(g.port, "mm1").status == 201
    g.stop()
    warns = policy_warnings(g)
    assert len(warns) == 1, warns
    assert "allkeys-lru" in warns[0]["msg"], warns


def test_evicting_policy_read_from_info_when_config_refused(idemgate, upstream,
                                                            redis_servers):
    port = free_port()
    redis_servers.start(port, ["--maxmemory-policy", "volatile-ttl", "--user",
                               "app", "on", ">pw", "~*", "&*", "+@all", "-config"])
    g = gate_on(idemgate, upstream,
                {"url": "redis://app:pw@127.0.0.1:%d/0" % port}, workers=2)
    assert wait_until(lambda: policy_warnings(g), timeout=10), g.stderr()
    auth = {"user": "app", "password": "pw"}
    before = stat_calls(port, "config|get", "rejected_calls", **auth)
    assert before >= 1
    kill_clients_and_wait(port, "config|get", "rejected_calls", before, 2, **auth)
    assert first_answer(g.port, "mm2").status == 201
    g.stop()
    warns = policy_warnings(g)
    assert len(warns) == 1, warns
    assert "volatile-ttl" in warns[0]["msg"], warns


def test_noeviction_is_not_warned(idemgate, upstream, redis_servers):
    port = free_port()
    redis_servers.start(port, ["--maxmemory-policy", "noeviction"])
    g = gate_on(idemgate, upstream, {"url": "redis://127.0.0.1:%d/0" % port},
                workers=2)
    assert wait_until(lambda: stat_calls(port, "config|get") >= 2, timeout=10), \
        "the two workers never read the policy"
    assert first_answer(g.port, "mm3").status == 201
    g.stop()
    assert policy_warnings(g) == [], policy_warnings(g)
