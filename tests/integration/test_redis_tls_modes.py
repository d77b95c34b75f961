"""rediss:// in cluster and sentinel mode (docs/configuration.md, redis.mode and
redis.tls): every connection of the store is TLS, so idemgate works with
Redis processes that speak nothing else.

The `redis_tls_servers` fixture (idemtest.fixtures) starts TLS-only
redis-servers (`--port 0 --tls-port P`, `--tls-replication yes`) with a
throwaway CA made for the test: start_cluster(3) is a cluster of three
masters whose bus is TLS too (`--tls-cluster yes`), start_sentinel() a
sentinel on a TLS port watching its master and replica over TLS. Every
Redis read below goes over TLS (redis_tls_servers.call). The patterns
are those of test_redis_modes.py (plain) and test_redis_tls.py
(standalone TLS)."""

import pytest

from idemtest.assertions import (after_release, assert_error, assert_replay_of,
                                 first_answer, wait_until)
from idemtest.config import gate_config
from idemtest.http import post
from idemtest.procs import free_port


def execute_once_and_replay(g, upstream, keys):
    """Each key executes once (retried past 503 while the store connects)
    and is replayed twice; a failure carries idemgate's log (not access
    lines), as these tests are about its Redis connections."""
    try:
        for k in keys:
            r1 = first_answer(g.port, k)
            assert r1.status == 201, (k, r1)
            assert r1.header("X-Exec") == "1", (k, r1)
            r2 = after_release(lambda k=k: post(g.port, "/count", k))
            assert_replay_of(r2, r1)
            r3 = post(g.port, "/count", k)
            assert_replay_of(r3, r1)
        for k in keys:
            assert upstream.count(k) == 1, (k, upstream.stats())
    except AssertionError as e:
        raise AssertionError("%s\nidemgate log:\n%s" % (e, store_log(g))) from e


def store_log(g):
    return "\n".join(ln for ln in g.stderr().splitlines() if '"msg":"access"' not in ln)


def rediss(port):
    # cluster / sentinel mode: only the scheme (and credentials) of the url
    # count; the nodes are in redis.nodes
    return "rediss://127.0.0.1:%d" % port


# -- cluster -------------------------------------------------------------------


@pytest.fixture
def tls_cluster(redis_tls_servers):
    """Three TLS-only masters in one cluster (TLS bus); returns their
    ports."""
    return redis_tls_servers.start_cluster(3)


def cluster_gate(idemgate, upstream, ports, tls, wait=True):
    cfg = gate_config({"store": "redis",
                       "redis": {"mode": "cluster", "url": rediss(ports[0]),
                                 "nodes": ["127.0.0.1:%d" % p for p in ports],
                                 "tls": tls}},
                      upstream.url)
    return idemgate(cfg, wait=wait)


def test_tls_cluster_fixture(redis_tls_servers, tls_cluster):
    """The fixture: TLS only, every slot served, CLUSTER SLOTS names the
    TLS ports (what idemgate's slot map is built from)."""
    rs = redis_tls_servers
    for p in tls_cluster:
        assert b"cluster_state:ok" in rs.call(p, "CLUSTER", "INFO")
        assert b"cluster_known_nodes:3" in rs.call(p, "CLUSTER", "INFO")
        # plain RESP is not answered
        assert rs.try_call(p, "PING", context=None, timeout=2) is None
    slots = rs.call(tls_cluster[0], "CLUSTER", "SLOTS")
    assert sorted(s[2][1] for s in slots) == sorted(tls_cluster), slots
    assert sum(s[1] - s[0] + 1 for s in slots) == 16384, slots


def test_cluster_rediss_execute_once_and_replay(idemgate, upstream, redis_tls_servers,
                                                 tls_cluster):
    g = cluster_gate(idemgate, upstream, tls_cluster, {"ca_file": redis_tls_servers.certs.ca})
    keys = ["tcl-%d" % i for i in range(20)]
    execute_once_and_replay(g, upstream, keys)
    # the records are spread over every master (read over TLS)
    sizes = [redis_tls_servers.call(p, "DBSIZE") for p in tls_cluster]
    assert sum(sizes) == len(keys), (sizes, store_log(g))
    assert all(n > 0 for n in sizes), sizes


def test_cluster_rediss_discovers_nodes_from_one_seed(idemgate, upstream,
                                                      redis_tls_servers, tls_cluster):
    """One seed: the other masters come from CLUSTER SLOTS and are reached
    over TLS as well."""
    cfg = gate_config({"store": "redis",
                       "redis": {"mode": "cluster", "url": rediss(tls_cluster[0]),
                                 "nodes": ["127.0.0.1:%d" % tls_cluster[1]],
                                 "tls": {"ca_file": redis_tls_servers.certs.ca}}},
                      upstream.url)
    g = idemgate(cfg)
    keys = ["tcs-%d" % i for i in range(20)]
    execute_once_and_replay(g, upstream, keys)
    sizes = [redis_tls_servers.call(p, "DBSIZE") for p in tls_cluster]
    assert sum(sizes) == len(keys), (sizes, store_log(g))
    assert all(n > 0 for n in sizes), sizes


def test_cluster_rediss_wrong_ca_is_store_unavailable(idemgate, upstream,
                                                      redis_tls_servers, tls_cluster):
    g = cluster_gate(idemgate, upstream, tls_cluster,
                     {"ca_file": redis_tls_servers.certs.wrong_ca})
    for k in ("tcw-1", "tcw-2", "tcw-3"):
        r = post(g.port, "/count", k)
        assert_error(r, 503, "store_unavailable")
    assert upstream.stats()["by_key"] == {}, upstream.stats()
    assert wait_until(lambda: "certificate verify failed" in g.stderr()), g.stderr()
    assert all(redis_tls_servers.call(p, "DBSIZE") == 0 for p in tls_cluster)


# -- sentinel ------------------------------------------------------------------


@pytest.fixture
def tls_sentinel(redis_tls_servers):
    """A TLS-only master, its replica (replicating over TLS) and one
    sentinel on a TLS port monitoring the master as "m"; returns (master
    port, replica port, sentinel port) once the replica's link is up."""
    rs = redis_tls_servers
    mp, rp = free_port(), free_port()
    rs.start(mp)
    rs.start(rp, ["--replicaof", "127.0.0.1", mp])
    assert wait_until(lambda: b"master_link_status:up" in
                      (rs.try_call(rp, "INFO", "replication") or b""),
                      timeout=20, interval=0.1), rs.try_call(rp, "INFO", "replication")
    return mp, rp, rs.start_sentinel(mp)


def sentinel_gate(idemgate, upstream, sentinel_ports, tls):
    cfg = gate_config({"store": "redis",
                       "redis": {"mode": "sentinel", "master_name": "m",
                                 "url": rediss(sentinel_ports[-1]),
                                 "nodes": ["127.0.0.1:%d" % p for p in sentinel_ports],
                                 "tls": tls}},
                      upstream.url)
    return idemgate(cfg)


def test_tls_sentinel_fixture(redis_tls_servers, tls_sentinel):
    rs = redis_tls_servers
    mp, rp, sp = tls_sentinel
    assert rs.call(sp, "SENTINEL", "get-master-addr-by-name", "m") == [
        b"127.0.0.1", str(mp).encode()]
    assert rs.try_call(sp, "PING", context=None, timeout=2) is None
    # the sentinel knows the replica (by its TLS port): what a failover needs
    assert wait_until(lambda: any(str(rp).encode() in r
                                  for r in rs.call(sp, "SENTINEL", "replicas", "m")),
                      timeout=15, interval=0.1)


def test_sentinel_rediss_execute_once_and_replay(idemgate, upstream, redis_tls_servers,
                                                  tls_sentinel):
    mp, rp, sp = tls_sentinel
    # a dead sentinel first: the store goes on to the next one
    g = sentinel_gate(idemgate, upstream, [free_port(), sp],
                      {"ca_file": redis_tls_servers.certs.ca})
    keys = ["tse-%d" % i for i in range(10)]
    execute_once_and_replay(g, upstream, keys)
    assert redis_tls_servers.call(mp, "DBSIZE") == len(keys)


def test_sentinel_rediss_wrong_ca_is_store_unavailable(idemgate, upstream,
                                                       redis_tls_servers, tls_sentinel):
    """The sentinel's certificate is not trusted: no master is learnt, the
    covered requests are refused and nothing is forwarded."""
    mp, rp, sp = tls_sentinel
    g = sentinel_gate(idemgate, upstream, [sp], {"ca_file": redis_tls_servers.certs.wrong_ca})
    for k in ("tsw-1", "tsw-2"):
        r = post(g.port, "/count", k)
        assert_error(r, 503, "store_unavailable")
    assert upstream.stats()["by_key"] == {}, upstream.stats()
    assert wait_until(lambda: "certificate verify failed" in g.stderr()), g.stderr()
    assert redis_tls_servers.call(mp, "DBSIZE") == 0


def test_sentinel_rediss_failover(idemgate, upstream, redis_tls_servers, tls_sentinel):
    """A forced SENTINEL FAILOVER: the new master (named by the sentinel,
    announced on +switch-master over TLS) takes new keys; what was
    recorded before is still replayed."""
    rs = redis_tls_servers
    mp, rp, sp = tls_sentinel
    g = sentinel_gate(idemgate, upstream, [sp], {"ca_file": rs.certs.ca})
    before = ["tsf-%d" % i for i in range(5)]
    execute_once_and_replay(g, upstream, before)
    assert rs.call(mp, "DBSIZE") == len(before)
    # the replica has them before the failover (nothing lost to it)
    assert wait_until(lambda: rs.call(rp, "DBSIZE") == len(before), timeout=10)
    # the sentinel must know the replica to promote it
    assert wait_until(lambda: any(str(rp).encode() in r
                                  for r in rs.call(sp, "SENTINEL", "replicas", "m")),
                      timeout=15, interval=0.1)

    assert rs.call(sp, "SENTINEL", "FAILOVER", "m") == b"OK"
    want = [b"127.0.0.1", str(rp).encode()]
    assert wait_until(lambda: rs.try_call(sp, "SENTINEL", "get-master-addr-by-name", "m")
                      == want, timeout=20, interval=0.1), \
        rs.try_call(sp, "SENTINEL", "get-master-addr-by-name", "m")
    assert wait_until(lambda: (rs.try_call(rp, "ROLE") or [b""])[0] == b"master",
                      timeout=10, interval=0.1)
    # The sentinel names the promoted replica (get-master-addr-by-name)
    # from the moment it reconfigures replicas, a moment before it
    # announces +switch-master; the old master, healthy in a forced
    # failover, takes writes until the sentinel turns it into a replica
    # (which may be seconds later) and loses them then. A key written in
    # that window would be forgotten (a Sentinel property, accounted for by
    # tests/faults/exactly_once.py), so the new key waits until idemgate
    # is on the new master.
    on_new = "sentinel master m is 127.0.0.1:%d" % rp
    assert wait_until(lambda: on_new in g.stderr(), timeout=15, interval=0.05), g.stderr()
    # it left the old master on the announcement (subscribed over TLS), not
    # on an error from it: the old master was still a master then
    moved = [ln["msg"] for ln in g.log_lines() if "moved to 127.0.0.1:%d" % rp in ln.get("msg", "")]
    assert len(moved) == 1, g.stderr()
    assert "answered READONLY" not in g.stderr(), g.stderr()

    # a new key: once, on the new master, then replayed
    r1 = first_answer(g.port, "tsf-new", timeout=20)
    assert r1.status == 201 and r1.header("X-Exec") == "1", (r1, g.stderr())
    r2 = after_release(lambda: post(g.port, "/count", "tsf-new"))
    assert_replay_of(r2, r1)
    r3 = post(g.port, "/count", "tsf-new")
    assert_replay_of(r3, r1)
    assert upstream.count("tsf-new") == 1
    assert rs.call(rp, "DBSIZE") == len(before) + 1
    # and the keys of before the failover replay from the new master
    for k in before:
        r = after_release(lambda k=k: post(g.port, "/count", k))
        assert r.status == 201 and r.header("Idempotent-Replayed") == "true", r
        assert upstream.count(k) == 1, k
