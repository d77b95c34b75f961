"""rediss:// (docs/configuration.md): the Redis store over TLS, verified against
`redis.tls` the way `upstream_tls` verifies an https upstream.

The `redis_tls` fixture (idemtest.fixtures) is a private redis-server
speaking TLS only (`--port 0 --tls-port P`), with a throwaway CA, a server
certificate for IP 127.0.0.1 and DNS localhost, and an unrelated CA, all
made with the `openssl` command in the test's temp dir. The first tests
check the fixture itself (Python's ssl module, no idemgate) and what `-t`
does with `redis.tls`; the others run idemgate's store over TLS."""

import json
import socket
import ssl

import pytest

from idemtest.assertions import after_release, assert_error, first_answer, wait_until
from idemtest.config import gate_config
from idemtest.http import post
from idemtest.procs import exit_code, run_idemgate
from idemtest.resp import call

def raw_tls_ping(port, ca, server_hostname):
    """PING on a TLS connection of its own; the raw reply line."""
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname=server_hostname) as t:
            t.sendall(b"*1\r\n$4\r\nPING\r\n")
            buf = b""
            while not buf.endswith(b"\r\n"):
                chunk = t.recv(64)
                if not chunk:
                    break
                buf += chunk
            return buf


# -- the fixture ---------------------------------------------------------------


def test_fixture_answers_over_tls(redis_tls):
    assert redis_tls.url == "rediss://127.0.0.1:%d/0" % redis_tls.port
    # verified by IP SAN and by DNS SAN
    assert raw_tls_ping(redis_tls.port, redis_tls.ca, "127.0.0.1") == b"+PONG\r\n"
    assert raw_tls_ping(redis_tls.port, redis_tls.ca, "localhost") == b"+PONG\r\n"
    # the RESP helper over TLS, as later tests read the store with it
    ctx = redis_tls.context()
    assert call(redis_tls.port, "SET", "k", "v", context=ctx) == b"OK"
    assert call(redis_tls.port, "GET", "k", context=ctx) == b"v"


def test_fixture_refuses_what_it_should(redis_tls):
    with pytest.raises(ssl.SSLCertVerificationError):
        raw_tls_ping(redis_tls.port, redis_tls.wrong_ca, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        raw_tls_ping(redis_tls.port, redis_tls.ca, "redis.example")
    # TLS only: plain RESP on the port gets no answer but a closed connection
    with socket.create_connection(("127.0.0.1", redis_tls.port), timeout=5) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        try:
            got = s.recv(64)
        except OSError:
            got = b""
        assert b"PONG" not in got


# -- the config (-t) -----------------------------------------------------------


def write_cfg(tmp_path, cfg):
    p = tmp_path / "idemgate.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_check_config_names_a_bad_ca_file(tmp_path, redis_tls):
    missing = str(tmp_path / "none.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for ca, why in ((missing, "No such file or directory"),
                    (str(tmp_path), "not a regular file"),
                    (str(junk), "no certificate")):
        path = write_cfg(tmp_path, {"redis": {"tls": {"ca_file": ca}}})
        r = run_idemgate(["-t", "-c", path, "--redis", redis_tls.url])
        assert r.returncode == 2, r
        lines = r.stderr.splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("config: redis.tls.ca_file: cannot load %s: " % ca), lines
        assert why in lines[0], lines
        assert r.stdout == ""
    # the right CA, or a bad one nothing reads (redis://, verify false)
    for redis, tls in (({"url": redis_tls.url}, {"ca_file": redis_tls.ca}),
                       ({"url": "redis://127.0.0.1:1"}, {"ca_file": missing}),
                       ({"url": redis_tls.url}, {"ca_file": missing, "verify": False})):
        path = write_cfg(tmp_path, {"redis": dict(redis, tls=tls)})
        r = run_idemgate(["-t", "-c", path])
        assert r.returncode == 0 and r.stdout == "configuration ok\n", r


# -- idemgate through rediss:// (the store side) --------------------------------


def gate_tls(idemgate, upstream, redis_tls, tls, wait=True):
    cfg = gate_config({"store": "redis", "redis": {"url": redis_tls.url, "tls": tls}},
                      upstream.url)
    return idemgate(cfg, wait=wait)


def test_rediss_executes_once_and_replays(idemgate, upstream, redis_tls):
    g = gate_tls(idemgate, upstream, redis_tls, {"ca_file": redis_tls.ca})
    r1 = first_answer(g.port, "t1")
    assert r1.status == 201 and r1.header("X-Exec") == "1", r1
    r2 = after_release(lambda: post(g.port, "/count", "t1"))
    assert r2.status == 201 and r2.replayed, r2
    assert upstream.count("t1") == 1
    # the record is in the TLS-only server
    assert call(redis_tls.port, "DBSIZE", context=redis_tls.context()) >= 1


def test_rediss_wrong_ca_is_store_unavailable(idemgate, upstream, redis_tls):
    g = gate_tls(idemgate, upstream, redis_tls, {"ca_file": redis_tls.wrong_ca})
    r = post(g.port, "/count", "t2")
    assert_error(r, 503, "store_unavailable")
    assert upstream.count("t2") == 0
    assert wait_until(lambda: "certificate verify failed" in g.stderr()), g.stderr()


def test_rediss_verify_false_accepts_any_certificate(idemgate, upstream, redis_tls):
    g = gate_tls(idemgate, upstream, redis_tls,
                 {"ca_file": redis_tls.wrong_ca, "verify": False})
    r1 = first_answer(g.port, "t3")
    assert r1.status == 201, r1
    r2 = after_release(lambda: post(g.port, "/count", "t3"))
    assert r2.status == 201 and r2.replayed, r2
    assert upstream.count("t3") == 1


def test_rediss_server_name_mismatch_fails(idemgate, upstream, redis_tls):
    g = gate_tls(idemgate, upstream, redis_tls,
                 {"ca_file": redis_tls.ca, "server_name": "redis.example"})
    r = post(g.port, "/count", "t4")
    assert_error(r, 503, "store_unavailable")
    assert upstream.count("t4") == 0
    assert wait_until(lambda: "certificate verify failed" in g.stderr()), g.stderr()
    # and server_name that the certificate names is fine
    g2 = gate_tls(idemgate, upstream, redis_tls,
                  {"ca_file": redis_tls.ca, "server_name": "localhost"})
    assert first_answer(g2.port, "t5").status == 201
