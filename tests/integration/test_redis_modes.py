"""idemgate on Redis Cluster and on Redis Sentinel (docs/configuration.md,
redis.mode): execute-once and replay over keys spread on the cluster's
masters, and through the master a sentinel names. The Redis processes are
private to each test (free 127.0.0.1 ports, a temp dir) and stopped at
teardown; every wait is bounded."""

import time

import pytest

from idemtest.assertions import after_release, assert_replay_of, first_answer
from idemtest.config import gate_config
from idemtest.http import post
from idemtest.procs import free_port
from idemtest.resp import call


@pytest.fixture
def cluster(redis_servers):
    """Three masters in one cluster; returns their ports."""
    return redis_servers.start_cluster(3)


@pytest.fixture
def sentinel(redis_servers):
    """A master, its replica and one sentinel monitoring it as "m";
    returns (master port, sentinel port)."""
    mp, rp = free_port(), free_port()
    redis_servers.start(mp)
    redis_servers.start(rp, ["--replicaof", "127.0.0.1", mp])
    return mp, redis_servers.start_sentinel(mp)


def execute_once_and_replay(g, upstream, keys):
    for k in keys:
        r1 = first_answer(g.port, k)
        assert r1.status == 201, r1
        assert r1.header("X-Exec") == "1", r1
        r2 = after_release(lambda k=k: post(g.port, "/count", k))
        assert_replay_of(r2, r1)
        r3 = post(g.port, "/count", k)
        assert_replay_of(r3, r1)
    for k in keys:
        assert upstream.count(k) == 1, k


def test_cluster_execute_once_and_replay(idemgate, upstream, cluster):
    cfg = gate_config({"store": "redis",
                       "redis": {"mode": "cluster",
                                 "nodes": ["127.0.0.1:%d" % p for p in cluster]}},
                      upstream.url)
    g = idemgate(cfg)
    keys = ["cl-%d" % i for i in range(20)]
    execute_once_and_replay(g, upstream, keys)
    # the records are spread over every master
    sizes = [call(p, "DBSIZE") for p in cluster]
    assert sum(sizes) == len(keys), sizes
    assert all(n > 0 for n in sizes), sizes


def test_sentinel_execute_once_and_replay(idemgate, upstream, sentinel):
    master, sent = sentinel
    cfg = gate_config({"store": "redis",
                       "redis": {"mode": "sentinel", "master_name": "m",
                                 "nodes": ["127.0.0.1:%d" % free_port(),
                                           "127.0.0.1:%d" % sent]}},
                      upstream.url)
    g = idemgate(cfg)
    keys = ["se-%d" % i for i in range(10)]
    execute_once_and_replay(g, upstream, keys)
    assert call(master, "DBSIZE") == len(keys)


def test_sentinel_without_pubsub(idemgate, upstream, redis_servers):
    """A sentinel that refuses SUBSCRIBE (its default user has no channel):
    the store works as before (failovers found from errors), and says so
    once at warn however often the subscriber tries again."""
    mp, rp = free_port(), free_port()
    redis_servers.start(mp)
    redis_servers.start(rp, ["--replicaof", "127.0.0.1", mp])
    sent = redis_servers.start_sentinel(mp, extra="user default on nopass resetchannels ~* +@all\n")
    cfg = gate_config({"store": "redis",
                       "redis": {"mode": "sentinel", "master_name": "m",
                                 "nodes": ["127.0.0.1:%d" % sent]}},
                      upstream.url)
    g = idemgate(cfg)
    execute_once_and_replay(g, upstream, ["np-%d" % i for i in range(5)])
    time.sleep(4)  # the subscriber tries again (backoff 0.1 s doubling to 2 s)
    execute_once_and_replay(g, upstream, ["np2-%d" % i for i in range(5)])
    assert call(mp, "DBSIZE") == 10
    warns = [ln for ln in g.log_lines() if "subscription" in ln.get("msg", "")]
    assert len(warns) == 1, warns
    assert warns[0]["level"] == "warn" and "NOPERM" in warns[0]["msg"], warns
