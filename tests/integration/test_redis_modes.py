"""idemgate on Redis Cluster and on Redis Sentinel (SPEC section 2,
redis.mode): execute-once and replay over keys spread on the cluster's
masters, and through the master a sentinel names. The Redis processes are
private to each test (free 127.0.0.1 ports, a temp dir) and stopped at
teardown; every wait is bounded."""

import shutil
import socket
import subprocess
import time

import pytest

from idemtest.assertions import after_release, assert_replay_of, wait_until
from idemtest.config import gate_config
from idemtest.http import post
from idemtest.procs import free_port

SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def cli(port, *args, timeout=10):
    out = subprocess.run([CLI, "-p", str(port)] + [str(a) for a in args],
                         capture_output=True, timeout=timeout, check=False)
    return out.stdout.decode().strip()


class Procs:
    """redis-server processes started by one test, all killed at the end."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, args, port):
        p = subprocess.Popen([SERVER] + [str(a) for a in args],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=self.workdir)
        self.procs.append(p)
        ok = wait_until(lambda: p.poll() is None and cli(port, "PING") == "PONG",
                        timeout=10, interval=0.05)
        if not ok:
            pytest.fail("redis-server did not start on %d" % port)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)


@pytest.fixture
def procs(tmp_path):
    ps = Procs(str(tmp_path))
    yield ps
    ps.stop()


def free_cluster_port():
    """A cluster node also listens on port + 10000 (its bus): both must be
    free, so the port must be below 55536."""
    for _ in range(1000):
        p = free_port()
        if p + 10000 > 65535:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
        finally:
            s.close()
    pytest.fail("no free port pair for a cluster node")


@pytest.fixture
def cluster(procs, tmp_path):
    """Three masters in one cluster; returns their ports."""
    ports = [free_cluster_port() for _ in range(3)]
    for p in ports:
        procs.start(["--port", p, "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(tmp_path),
                     "--cluster-enabled", "yes",
                     "--cluster-config-file", "nodes-%d.conf" % p], p)
    out = subprocess.run(
        [CLI, "--cluster", "create"] + ["127.0.0.1:%d" % p for p in ports] +
        ["--cluster-replicas", "0", "--cluster-yes"],
        capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_until(lambda: all("cluster_state:ok" in cli(p, "CLUSTER", "INFO")
                                  for p in ports), timeout=30, interval=0.1)
    return ports


@pytest.fixture
def sentinel(procs, tmp_path):
    """A master, its replica and one sentinel monitoring it as "m";
    returns (master port, sentinel port)."""
    mp, rp, sp = free_port(), free_port(), free_port()
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    procs.start(["--port", mp] + base, mp)
    procs.start(["--port", rp, "--replicaof", "127.0.0.1", mp] + base, rp)
    conf = tmp_path / ("sentinel-%d.conf" % sp)
    conf.write_text("port %d\nbind 127.0.0.1\ndir %s\n"
                    "sentinel monitor m 127.0.0.1 %d 1\n"
                    "sentinel down-after-milliseconds m 1000\n"
                    "sentinel failover-timeout m 3000\n" % (sp, tmp_path, mp))
    procs.start([str(conf), "--sentinel"], sp)
    assert wait_until(lambda: cli(sp, "SENTINEL", "get-master-addr-by-name", "m")
                      .split() == ["127.0.0.1", str(mp)], timeout=20, interval=0.1)
    return mp, sp


def first_answer(port, key, timeout=10.0):
    """The first request, retried while the store answers 503 (the gateway
    may take a moment to learn the topology)."""
    deadline = time.monotonic() + timeout
    while True:
        r = post(port, "/count", key)
        if r.status != 503 or time.monotonic() >= deadline:
            return r
        time.sleep(0.1)


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
    sizes = [int(cli(p, "DBSIZE")) for p in cluster]
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
    assert int(cli(master, "DBSIZE")) == len(keys)
