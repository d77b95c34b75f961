"""pytest fixtures shared by the suites (a conftest.py imports the ones it
offers): upstream / upstream2 (upstream.py), redis (a private
redis-server), redis_servers (several, for one test), redis_tls (a
private redis-server speaking TLS only, with its throwaway CA and a
wrong one), redis_tls_servers (several speaking TLS only: a TLS cluster,
a TLS sentinel group), store_cfg (the
store settings, once per store: memory, then redis), proto (a
proto.Proto, once per protocol: h1, then h2), idemgate (a factory),
execup (the execution-logging upstream, a factory). Every one is stopped
at teardown.
"""

import os

import pytest

from . import procs
from .certs import make_certs
from .config import STORES, store_config
from .proto import PROTOS, Proto


@pytest.fixture
def upstream():
    up = procs.Upstream()
    yield up
    up.stop()


@pytest.fixture
def upstream2():
    up = procs.Upstream()
    yield up
    up.stop()


@pytest.fixture
def redis():
    r = procs.RedisServer()
    yield r
    r.stop()


@pytest.fixture
def redis_tls(tmp_path):
    """A procs.RedisTLSServer on a free port, TLS only, with certificates
    made for this test in tmp_path/tls (certs.make_certs). Its API:
    .port (the TLS port), .url ("rediss://127.0.0.1:port/0"), .ca (the CA
    that signed the server's certificate: IP 127.0.0.1, DNS localhost),
    .wrong_ca (a CA that signed nothing), .certs (every path), .context(ca=
    None) (an ssl.SSLContext trusting .ca, or ca), .proc. Killed at
    teardown."""
    certs = make_certs(str(tmp_path / "tls"))
    r = procs.RedisTLSServer(certs, workdir=str(tmp_path))
    r.ca, r.wrong_ca = certs.ca, certs.wrong_ca
    yield r
    r.stop()


@pytest.fixture
def redis_servers(tmp_path):
    """procs.RedisServers in tmp_path: start(port, args, ...) and
    start_sentinel(master_port, ...); all killed at teardown."""
    s = procs.RedisServers(str(tmp_path))
    yield s
    s.stop()


@pytest.fixture
def redis_tls_servers(tmp_path):
    """procs.RedisServers in tmp_path with certificates made for this test
    in tmp_path/tls (certs.make_certs(client=True): the servers present
    theirs to each other too): every server TLS only, replicating over TLS;
    start_cluster(n) a cluster whose bus is TLS (--tls-cluster yes),
    start_sentinel(master_port) a sentinel on a TLS port watching its
    servers over TLS. Also .certs (.ca, .wrong_ca, ...), .context(ca=None),
    .call(port, ...) / .try_call (RESP over TLS). All killed at
    teardown."""
    certs = make_certs(str(tmp_path / "tls"), client=True)
    s = procs.RedisServers(str(tmp_path), certs=certs)
    yield s
    s.stop()


@pytest.fixture(params=STORES)
def store_cfg(request):
    """config.store_config() for each of STORES (the `redis` fixture is
    started only for "redis")."""
    redis = request.getfixturevalue("redis") if request.param == "redis" else None
    return store_config(request.param, redis)


@pytest.fixture(params=PROTOS)
def proto(request):
    """A proto.Proto for each of PROTOS: the test sends its requests with
    proto.post() / proto.request() over HTTP/1.1, then over HTTP/2."""
    return Proto(request.param)


@pytest.fixture
def idemgate(tmp_path):
    """Factory: idemgate(config=None, args=(), env=None, wait=True) starts
    one idemgate with config merged onto {"listen": free port, "workers": 1,
    "admin": {"listen": "off"}} and returns a procs.Idemgate. Every
    instance is stopped at teardown; its exit code there is not checked."""
    binary = procs.idemgate_bin()
    if not os.path.exists(binary):
        pytest.fail("idemgate binary not found at %s (set IDEMGATE_BIN)" % binary)
    started = []

    def factory(config=None, args=(), env=None, wait=True):
        g = procs.Idemgate(str(tmp_path), config, args, env, wait=False)
        started.append(g)
        if wait:
            try:
                g.wait_ready()
            except RuntimeError as e:
                pytest.fail(str(e))
        return g

    yield factory
    for g in started:
        try:
            g.stop(timeout=10)
        except Exception:  # noqa: BLE001 - teardown must go on
            g.kill()


@pytest.fixture
def execup(tmp_path):
    """Factory: execup(nports=1) starts execup.py logging to a file in
    tmp_path; every one started is stopped at teardown."""
    started = []

    def factory(nports=1):
        up = procs.ExecUpstream(str(tmp_path / ("exec-%d.log" % len(started))), nports)
        started.append(up)
        return up

    yield factory
    for up in started:
        up.stop()
