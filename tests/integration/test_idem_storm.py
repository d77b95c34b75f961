"""Concurrency storms (docs/requests.md): many clients, one key, released
together by a barrier, each on its own connection -> exactly one upstream
execution; every other answer is 409 request_in_progress or the replay.
"""

import pytest

from idemtest.assertions import after_release, assert_in_progress, assert_replay_of
from idemtest.config import gate_config, store_config
from idemtest.http import post
from idemtest.storm import storm, storm_two_bodies

PATH = "/count?ms=300"


def check_storm(results, upstream, key, allow_409=True):
    """Exactly one original 201 (n == 1); everything else is its replay or
    409 request_in_progress."""
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    originals = [r for r in results if r.status == 201 and not r.replayed]
    assert len(originals) == 1, [r for r in results if r.status != 409][:5]
    first = originals[0]
    assert first.json() == {"n": 1, "key": key}, first
    n409 = 0
    for r in results:
        if r is first:
            continue
        if r.status == 409:
            assert allow_409, r
            assert_in_progress(r)
            n409 += 1
        else:
            assert_replay_of(r, first)
    assert upstream.count(key) == 1
    return n409


@pytest.mark.parametrize("kind,workers", [("redis", 1), ("redis", 2),
                                          ("memory", 1), ("memory", 2)])
def test_storm_one_key(idemgate, upstream, request, kind, workers):
    redis = request.getfixturevalue("redis") if kind == "redis" else None
    g = idemgate(gate_config(store_config(kind, redis), upstream.url,
                             workers=workers))
    results = storm([g.port], PATH, "storm1", 50)
    check_storm(results, upstream, "storm1")
    assert upstream.stats()["total"] == 1


def test_storm_two_instances_one_redis(idemgate, upstream, redis):
    cfg = gate_config({"store": "redis", "redis": {"url": redis.url}},
                      upstream.url)
    a = idemgate(cfg)
    b = idemgate(cfg)
    results = storm([a.port, b.port], PATH, "storm2", 50)
    check_storm(results, upstream, "storm2")
    assert upstream.stats()["total"] == 1
    # both instances replay afterwards
    first = [r for r in results if r.status == 201 and not r.replayed][0]
    assert_replay_of(after_release(lambda: post(a.port, PATH, "storm2")), first)
    assert_replay_of(after_release(lambda: post(b.port, PATH, "storm2")), first)


def test_storm_two_instances_two_workers_each(idemgate, upstream, redis):
    cfg = gate_config({"store": "redis", "redis": {"url": redis.url}},
                      upstream.url, workers=2)
    a = idemgate(cfg)
    b = idemgate(cfg)
    results = storm([a.port, b.port], PATH, "storm3", 50)
    check_storm(results, upstream, "storm3")


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_storm_many_keys(idemgate, upstream, request, kind):
    redis = request.getfixturevalue("redis") if kind == "redis" else None
    g = idemgate(gate_config(store_config(kind, redis), upstream.url, workers=2))
    keys = ["mk-%02d" % i for i in range(20)]
    results = storm([g.port], PATH, lambda i: keys[i % 20], 100)
    for j, key in enumerate(keys):
        mine = [results[i] for i in range(100) if i % 20 == j]
        check_storm(mine, upstream, key)
    st = upstream.stats()
    assert st["total"] == 20, st
    for key in keys:
        assert st["by_key"].get(key) == 1, (key, st["by_key"])


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_storm_concurrent_wait_all_replay(idemgate, upstream, request, kind):
    """With concurrent: wait every duplicate gets the replay, none a 409."""
    redis = request.getfixturevalue("redis") if kind == "redis" else None
    g = idemgate(gate_config(store_config(kind, redis), upstream.url,
                             {"concurrent": "wait", "wait_max_ms": 10000}))
    results = storm([g.port], PATH, "storm4", 30)
    check_storm(results, upstream, "storm4", allow_409=False)


def test_storm_same_key_different_bodies(idemgate, upstream, redis):
    """Half the clients send another body: one execution in all; the other
    body's clients get 409 idempotency_key_reuse (or in-progress when they
    share the winner's body)."""
    g = idemgate(gate_config({"store": "redis", "redis": {"url": redis.url}},
                             upstream.url))
    storm_two_bodies(g.port, upstream, PATH, "storm5")
