"""docs/stores.md "The LMDB store": `store: "lmdb"` end to end, with real
idemgate processes on a directory of their own. A replay is byte for byte;
records survive SIGTERM and SIGKILL; two processes on one path and one
listen address share keys (a storm over both runs once); one with another
store or another path is refused the address; -t refuses a path that
cannot be created (exit 2), the start refuses a data.mdb that is not
LMDB's (exit 1); the lock of a SIGKILLed process expires after
lock_seconds; /keys and rate limits work on it. Every wait is bounded."""

import os
import signal
import threading

import pytest

from idemtest.assertions import wait_until
from idemtest.http import hdrs, request
from idemtest.procs import exit_code, free_port, run_idemgate
from idemtest.storm import storm


def lmdb_cfg(upstream, path, sync="os", **top):
    cfg = {"store": "lmdb", "upstream": upstream.url,
           "lmdb": {"path": str(path), "max_bytes": 16 << 20, "sync": sync}}
    cfg.update(top)
    return cfg


def log_msgs(g):
    return [ln.get("msg", ln.get("_raw")) for ln in g.log_lines()]


def post(g, key, path="/count", api_key="k1", body=b'{"a": 1}'):
    return request(g.port, "POST", path, hdrs(key, api_key), body)


# "fsync": every write goes through the writer thread's group commit.
@pytest.mark.parametrize("sync", ["os", "fsync"])
def test_replay_byte_for_byte(idemgate, upstream, tmp_path, sync):
    g = idemgate(lmdb_cfg(upstream, tmp_path / "db", sync))
    first = post(g, "replay-1")
    assert first.status == 201, first
    again = post(g, "replay-1")
    assert again.status == 201
    assert again.body == first.body
    assert again.header("Idempotent-Replayed") == "true"
    assert again.header("X-Exec") == first.header("X-Exec")
    assert upstream.count("replay-1") == 1
    other = post(g, "replay-1", body=b'{"a": 2}')
    assert other.status in (409, 422), other
    assert os.path.exists(tmp_path / "db" / "data.mdb")


@pytest.mark.parametrize("sync", ["os", "fsync"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_keeps_records(idemgate, upstream, tmp_path, sig, sync):
    cfg = lmdb_cfg(upstream, tmp_path / "db", sync)
    g = idemgate(cfg)
    first = post(g, "kept")
    assert first.status == 201
    if sig == signal.SIGTERM:
        assert g.stop() == 0
    else:
        g.kill()
    h = idemgate(cfg)
    again = post(h, "kept")
    assert again.status == 201
    assert again.body == first.body
    assert again.header("Idempotent-Replayed") == "true"
    assert upstream.count("kept") == 1


@pytest.mark.parametrize("sync", ["os", "fsync"])
def test_two_processes_share_one_path_and_address(idemgate, upstream, tmp_path, sync):
    listen = "127.0.0.1:%d" % free_port()
    cfg = lmdb_cfg(upstream, tmp_path / "db", sync, listen=listen, workers=2)
    a = idemgate(cfg)
    b = idemgate(cfg, wait=False)
    assert wait_until(lambda: any(m and "listening on" in m for m in log_msgs(b))
                      or not b.alive(), 10), b.stderr()
    assert b.alive(), b.stderr()
    res = storm([a.port], "/count?ms=300", "storm-1", 20)
    statuses = [r.status for r in res if not isinstance(r, Exception)]
    assert len(statuses) == 20, res
    assert statuses.count(201) >= 1
    assert set(statuses) <= {201, 409}, statuses
    assert upstream.count("storm-1") == 1
    # each process reached (the kernel spread the connections), one store
    for i in range(30):
        assert post(a, "spread-%d" % i).status == 201
    assert a.access_lines() and b.access_lines(), "connections did not reach both"
    # a key completed through one is replayed by the other
    assert post(a, "spread-0").header("Idempotent-Replayed") == "true"
    assert a.stop() == 0
    r = post(b, "spread-1")
    assert r.header("Idempotent-Replayed") == "true"


@pytest.mark.parametrize("other", ["memory", "path"])
def test_another_store_is_refused(idemgate, upstream, tmp_path, other):
    listen = "127.0.0.1:%d" % free_port()
    idemgate(lmdb_cfg(upstream, tmp_path / "db", listen=listen))
    if other == "memory":
        cfg = {"store": "memory", "upstream": upstream.url, "listen": listen}
        line = "cannot listen on %s: held by another idemgate using the lmdb store" % listen
    else:
        cfg = lmdb_cfg(upstream, tmp_path / "db2", listen=listen)
        line = None
    g = idemgate(cfg, wait=False)
    code = exit_code(g, timeout=10)
    assert code == 1, g.stderr()
    msgs = log_msgs(g)
    assert len(msgs) == 1, msgs
    if line:
        assert msgs == [line]
    else:
        assert msgs[0].startswith("cannot listen on %s: held by another idemgate" % listen), msgs


def test_lmdb_first_refused_by_memory_holder(idemgate, upstream, tmp_path):
    listen = "127.0.0.1:%d" % free_port()
    idemgate({"store": "memory", "upstream": upstream.url, "listen": listen})
    g = idemgate(lmdb_cfg(upstream, tmp_path / "db", listen=listen), wait=False)
    assert exit_code(g, timeout=10) == 1
    assert log_msgs(g) == [
        "cannot listen on %s: held by another idemgate using the memory store" % listen]


def test_test_config_checks_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = str(blocker / "sub")
    r = run_idemgate(["--store", "lmdb", "-t"], env={"IDEMGATE_LMDB_PATH": bad})
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lmdb.path" in lines[0] and bad in lines[0], r.stderr
    good = str(tmp_path / "made" / "here")
    r = run_idemgate(["--store", "lmdb", "-t"], env={"IDEMGATE_LMDB_PATH": good})
    assert r.returncode == 0, r
    assert r.stdout.strip() == "configuration ok"
    assert os.path.isdir(good)


def test_not_an_lmdb_file_fails_the_start(idemgate, upstream, tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "data.mdb").write_bytes(b"this is not an LMDB environment" * 400)
    g = idemgate(lmdb_cfg(upstream, d), wait=False)
    assert exit_code(g, timeout=10) == 1
    msgs = log_msgs(g)
    assert len(msgs) == 1 and "lmdb.path" in msgs[0], msgs


def test_lock_of_a_killed_process_expires(idemgate, upstream, tmp_path):
    cfg = lmdb_cfg(upstream, tmp_path / "db", idempotency={"lock_seconds": 2})
    a = idemgate(cfg)
    t = threading.Thread(target=lambda: _quiet(lambda: post(a, "orphan", "/count?ms=5000")),
                         daemon=True)
    t.start()
    assert wait_until(lambda: upstream.in_flight() >= 1, 5)
    a.kill()
    b = idemgate(cfg)
    r = post(b, "orphan")
    assert r.status == 409, r  # the dead process's lock is still there
    assert wait_until(lambda: post(b, "orphan").status == 201, 8)
    t.join(5)


def _quiet(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - the connection dies with the process
        pass


def test_keys_api(idemgate, upstream, tmp_path):
    admin = free_port()
    g = idemgate(lmdb_cfg(upstream, tmp_path / "db",
                          admin={"listen": "127.0.0.1:%d" % admin}))
    assert post(g, "adm-1", api_key="cred").status == 201
    h = {"Idempotency-Scope-Credential": "Bearer cred"}
    r = request(admin, "GET", "/keys/adm-1", h)
    assert r.status == 200, r
    doc = r.json()
    assert doc["key"] == "adm-1" and doc["state"] == "completed", doc
    r = request(admin, "GET", "/keys/adm-1?scope=%s" % doc["scope"][:6])
    assert r.status == 200 and r.json()["key"] == "adm-1", r
    assert request(admin, "DELETE", "/keys/adm-1", h).status == 204
    assert request(admin, "GET", "/keys/adm-1", h).status == 404
    assert post(g, "adm-1", api_key="cred").header("Idempotent-Replayed") is None
    assert upstream.count("adm-1") == 2
    text = request(admin, "GET", "/metrics").body.decode()
    assert 'idemgate_lmdb_store_entries{state="completed"} 1' in text, text
    assert "idemgate_lmdb_store_max_bytes %d" % (16 << 20) in text


def test_rate_limit(idemgate, upstream, tmp_path):
    cfg = lmdb_cfg(upstream, tmp_path / "db",
                   ratelimit={"enabled": True, "requests": 3, "window_seconds": 60,
                              "concurrent": 0})
    g = idemgate(cfg)
    got = [post(g, "rl-%d" % i, api_key="rl").status for i in range(5)]
    assert got == [201, 201, 201, 429, 429], got
    # the limit lives in the file: a restarted process still refuses
    assert g.stop() == 0
    h = idemgate(cfg)
    assert post(h, "rl-9", api_key="rl").status == 429
    assert post(h, "rl-10", api_key="other").status == 201
