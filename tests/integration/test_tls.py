"""TLS end to end (docs/headers.md): HTTPS clients terminated by idemgate
(`tls`), https:// upstreams verified against `upstream_tls`.

A throwaway CA and server certificate (IP 127.0.0.1 and DNS localhost) are
made with the `openssl` command in a temp dir for the session; a second CA
that signed nothing plays the wrong trust anchor."""

import hashlib
import os
import socket
import ssl
import time

import pytest

from idemtest.assertions import assert_error, wait_until
from idemtest.certs import make_certs
from idemtest.http import Client, hdrs, parse_responses, raw_closed, recv_to_close, request
from idemtest.procs import Idemgate, Upstream, exit_code
from idemtest.storm import in_threads

BIG = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    c = make_certs(str(tmp_path_factory.mktemp("tls")))
    return {"ca": c.ca, "other_ca": c.wrong_ca, "cert": c.cert, "key": c.key}


@pytest.fixture
def tls_upstream(certs):
    """upstream.py serving HTTPS with the test certificate."""
    up = Upstream(args=["--tls-cert", certs["cert"], "--tls-key", certs["key"]],
                  context=client_ctx(certs["ca"]))
    yield up
    up.stop()


def client_ctx(ca, alpn=("http/1.1",)):
    """An HTTP/1.1 client's context: it offers only what it speaks (a
    client offering h2 gets HTTP/2: test_alpn_prefers_h2)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def https_request(port, method, path, headers=None, body=b"", ca=None,
                  timeout=20):
    return request(port, method, path, headers, body, timeout=timeout,
                   context=client_ctx(ca))


def https_client(port, ca, timeout=20):
    """A Client over HTTPS (one keep-alive TLS connection)."""
    return Client(port, timeout, context=client_ctx(ca))


def gate(idemgate, certs, upstream_url, tls_server=True, upstream_tls=None,
         limits=None):
    cfg = {"upstream": upstream_url, "store": "memory"}
    if tls_server:
        cfg["tls"] = {"cert_file": certs["cert"], "key_file": certs["key"]}
    if upstream_tls is not None:
        cfg["upstream_tls"] = upstream_tls
    if limits:
        cfg["limits"] = limits
    return idemgate(cfg)


def alpn_selected(port, ca, offer):
    """The protocol the server picks from offer, on a fresh TLS connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_ctx(ca, offer).wrap_socket(raw, server_hostname="localhost") as s:
            return s.selected_alpn_protocol()


def test_alpn_prefers_h2(idemgate, upstream, certs):
    """h2 first when the client offers it, http/1.1 for a client that only
    speaks that; with http2.enabled false, never h2."""
    g = gate(idemgate, certs, upstream.url)
    assert alpn_selected(g.port, certs["ca"], ["h2", "http/1.1"]) == "h2"
    assert alpn_selected(g.port, certs["ca"], ["http/1.1", "h2"]) == "h2"
    assert alpn_selected(g.port, certs["ca"], ["http/1.1"]) == "http/1.1"
    g.stop()
    cfg = {"upstream": upstream.url, "store": "memory", "http2": {"enabled": False},
           "tls": {"cert_file": certs["cert"], "key_file": certs["key"]}}
    g2 = idemgate(cfg)
    assert alpn_selected(g2.port, certs["ca"], ["h2", "http/1.1"]) == "http/1.1"


def header_values(resp, name):
    return [v for k, v in resp.json()["headers"] if k.lower() == name.lower()]


# -- HTTPS from clients -------------------------------------------------------


def test_https_client_keepalive_and_forwarded_proto(idemgate, upstream, certs):
    g = gate(idemgate, certs, upstream.url)
    c = https_client(g.port, certs["ca"])
    socks = set()
    for i in range(20):
        r = c.request("GET", "/echo?i=%d" % i)
        assert r.status == 200, (i, r)
        assert r.json()["path"] == "/echo?i=%d" % i
        assert header_values(r, "X-Forwarded-Proto") == ["https"], r
        assert not c.last_will_close, (i, r.headers)
        socks.add(id(c.conn.sock))
    assert c.reconnects == 0 and len(socks) == 1
    assert c.conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert c.conn.sock.selected_alpn_protocol() == "http/1.1"
    c.close()


def test_https_idempotent_post_replayed(idemgate, upstream, certs):
    g = gate(idemgate, certs, upstream.url)
    h = hdrs("tls-key-1")
    r1 = https_request(g.port, "POST", "/count", h, b'{"a":1}', ca=certs["ca"])
    assert r1.status == 201, r1
    assert r1.header("Idempotent-Replayed") is None
    r2 = https_request(g.port, "POST", "/count", h, b'{"a":1}', ca=certs["ca"])
    assert r2.status == 201, r2
    assert r2.header("Idempotent-Replayed") == "true"
    assert r2.body == r1.body
    assert upstream.count("tls-key-1") == 1


def test_https_pipelined_requests(idemgate, upstream, certs):
    """Five requests in one TLS write: what OpenSSL decrypted but the
    request reader did not take yet must be served without a new edge."""
    g = gate(idemgate, certs, upstream.url)
    raw_sock = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    s = client_ctx(certs["ca"]).wrap_socket(raw_sock,
                                            server_hostname="127.0.0.1")
    try:
        reqs = b"".join(b"POST /echo?i=%d HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 3000\r\n\r\n" % i + b"b" * 3000
                        for i in range(4))
        reqs += b"GET /echo?i=4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        s.sendall(reqs)
        data = recv_to_close(s, timeout=10)
    finally:
        s.close()
    resps = parse_responses(data)
    assert [r.status for r in resps] == [200] * 5, resps
    assert [r.json()["path"] for r in resps] == ["/echo?i=%d" % i
                                                 for i in range(5)]


def test_plain_http_on_tls_port_is_closed(idemgate, upstream, certs):
    g = gate(idemgate, certs, upstream.url)
    out, closed = raw_closed(g.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
                             timeout=5)
    assert closed
    assert b"HTTP/1.1 200" not in out
    assert g.alive()
    r = https_request(g.port, "GET", "/echo", ca=certs["ca"])
    assert r.status == 200, r
    assert wait_until(lambda: "TLS handshake failed" in g.stderr(), 5)


def test_silent_client_handshake_bounded_by_client_timeout(idemgate, upstream,
                                                           certs):
    g = gate(idemgate, certs, upstream.url,
             limits={"client_timeout_ms": 300})
    t0 = time.monotonic()
    _, closed = raw_closed(g.port, b"", timeout=5)
    assert closed
    assert time.monotonic() - t0 < 4
    assert g.alive()


def test_untrusted_client_gets_no_answer_and_gate_survives(idemgate, upstream,
                                                           certs):
    g = gate(idemgate, certs, upstream.url)
    with pytest.raises(ssl.SSLError):
        https_request(g.port, "GET", "/echo", ca=certs["other_ca"])
    assert https_request(g.port, "GET", "/echo", ca=certs["ca"]).status == 200


def test_bad_key_file_is_a_config_error(tmp_path, certs):
    """A start loads the pair as -t does (test_cli.py): exit 2, one line
    naming tls.key_file."""
    bad = tmp_path / "bad.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n"
                   "-----END PRIVATE KEY-----\n")
    for key in (str(bad), str(tmp_path / "missing.key")):
        g = Idemgate(str(tmp_path), {
            "store": "memory",
            "tls": {"cert_file": certs["cert"], "key_file": key}}, wait=False)
        code = exit_code(g, timeout=10)
        assert code == 2, g.stderr()
        lines = g.stderr().strip().splitlines()
        assert len(lines) == 1, g.stderr()
        assert lines[0].startswith("config: tls.key_file: cannot load %s: " % key), lines


def test_key_not_matching_cert_is_a_config_error(tmp_path, certs):
    g = Idemgate(str(tmp_path), {
        "store": "memory",
        "tls": {"cert_file": certs["ca"], "key_file": certs["key"]}},
        wait=False)
    code = exit_code(g, timeout=10)
    assert code == 2, g.stderr()
    assert g.stderr().strip() == (
        "config: tls.key_file: %s does not match the certificate in %s"
        % (certs["key"], certs["ca"])), g.stderr()


def test_unreadable_upstream_ca_exits_1(tmp_path, certs):
    g = Idemgate(str(tmp_path), {
        "store": "memory", "upstream": "https://127.0.0.1:1",
        "upstream_tls": {"ca_file": str(tmp_path / "nope.crt")}}, wait=False)
    code = exit_code(g, timeout=10)
    assert code == 1, g.stderr()
    assert "upstream CA" in g.stderr(), g.stderr()


# -- https upstreams ------------------------------------------------------------


def test_https_upstream_verified_and_pooled(idemgate, tls_upstream, certs):
    g = gate(idemgate, certs, tls_upstream.url, tls_server=False,
             upstream_tls={"ca_file": certs["ca"]})
    before = tls_upstream.stats()["connections"]
    c = Client(g.port)
    for i in range(20):
        r = c.request("POST" if i % 2 else "GET", "/echo?i=%d" % i,
                      body=b"x" * i)
        assert r.status == 200, (i, r)
        assert r.json()["body_len"] == i
        assert header_values(r, "X-Forwarded-Proto") == ["http"]
    c.close()
    after = tls_upstream.stats()["connections"]
    # one for the stats request itself, a spare at most
    assert after - before <= 3, (before, after)


def test_https_upstream_idempotent_post(idemgate, tls_upstream, certs):
    g = gate(idemgate, certs, tls_upstream.url, tls_server=False,
             upstream_tls={"ca_file": certs["ca"]})
    h = hdrs("tls-up-1")
    r1 = request(g.port, "POST", "/count", h, b"{}")
    r2 = request(g.port, "POST", "/count", h, b"{}")
    assert r1.status == 201 and r2.status == 201, (r1, r2)
    assert r2.header("Idempotent-Replayed") == "true"
    assert tls_upstream.count("tls-up-1") == 1


def test_https_upstream_server_name_localhost(idemgate, tls_upstream, certs):
    g = gate(idemgate, certs, tls_upstream.url, tls_server=False,
             upstream_tls={"ca_file": certs["ca"],
                           "server_name": "localhost"})
    assert request(g.port, "GET", "/echo").status == 200


def test_https_upstream_wrong_ca_502(idemgate, tls_upstream, certs):
    g = gate(idemgate, certs, tls_upstream.url, tls_server=False,
             upstream_tls={"ca_file": certs["other_ca"]})
    r = request(g.port, "GET", "/echo")
    assert_error(r, 502, "upstream_unavailable")
    assert wait_until(lambda: "certificate verify failed" in g.stderr(), 5), g.stderr()
    # and nothing reached the application
    assert tls_upstream.stats()["by_path"].get("/echo") is None


def test_https_upstream_verify_false_accepts_wrong_ca(idemgate, tls_upstream,
                                                      certs):
    g = gate(idemgate, certs, tls_upstream.url, tls_server=False,
             upstream_tls={"ca_file": certs["other_ca"], "verify": False})
    r = request(g.port, "GET", "/echo")
    assert r.status == 200, r


def test_https_upstream_server_name_mismatch_502(idemgate, tls_upstream,
                                                 certs):
    g = gate(idemgate, certs, tls_upstream.url, tls_server=False,
             upstream_tls={"ca_file": certs["ca"],
                           "server_name": "wrong.example"})
    r = request(g.port, "GET", "/echo")
    assert_error(r, 502, "upstream_unavailable")
    assert wait_until(lambda: "hostname mismatch" in g.stderr(), 5), g.stderr()


def test_https_upstream_plain_server_502(idemgate, upstream, certs):
    url = "https://127.0.0.1:%d" % upstream.port
    g = gate(idemgate, certs, url, tls_server=False,
             upstream_tls={"ca_file": certs["ca"]})
    assert_error(request(g.port, "GET", "/echo"), 502, "upstream_unavailable")
    assert wait_until(lambda: "TLS handshake failed" in g.stderr(), 5), g.stderr()


def test_https_upstream_silent_server_bounded_by_connect_timeout(idemgate,
                                                                  certs):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)  # accepts TCP, never speaks TLS
    try:
        url = "https://127.0.0.1:%d" % lsock.getsockname()[1]
        g = gate(idemgate, certs, url, tls_server=False,
                 upstream_tls={"ca_file": certs["ca"]},
                 limits={"upstream_connect_timeout_ms": 300})
        t0 = time.monotonic()
        r = request(g.port, "GET", "/echo")
        assert_error(r, 502, "upstream_unavailable")
        assert time.monotonic() - t0 < 5
    finally:
        lsock.close()


# -- both sides ---------------------------------------------------------------


def test_2mb_both_ways_tls_on_both_sides(idemgate, tls_upstream, certs):
    g = gate(idemgate, certs, tls_upstream.url,
             upstream_tls={"ca_file": certs["ca"]})
    body = os.urandom(BIG)
    c = https_client(g.port, certs["ca"], timeout=60)
    r = c.request("POST", "/upload", {"Content-Type": "application/x-bin"},
                  body)
    assert r.status == 200, r
    assert r.json() == {"len": BIG,
                        "sha256": hashlib.sha256(body).hexdigest()}
    want = (bytes(range(256)) * (BIG // 256 + 1))[:BIG]
    r = c.request("GET", "/big?bytes=%d" % BIG)
    assert r.status == 200 and r.body == want
    r = c.request("GET", "/bigchunked?bytes=%d" % BIG)
    assert r.status == 200 and r.body == want
    r = c.request("POST", "/echo", body=body)
    assert r.status == 200 and r.json()["body_len"] == BIG
    assert header_values(r, "X-Forwarded-Proto") == ["https"]
    assert c.reconnects == 0
    c.close()


def test_many_parallel_https_clients(idemgate, tls_upstream, certs):
    g = gate(idemgate, certs, tls_upstream.url,
             upstream_tls={"ca_file": certs["ca"]})
    errors = []

    def worker(n):
        try:
            c = https_client(g.port, certs["ca"])
            for i in range(10):
                r = c.request("POST", "/upload", body=b"%d-%d" % (n, i) * 999)
                if r.status != 200 or r.json()["len"] != len(
                        b"%d-%d" % (n, i) * 999):
                    errors.append((n, i, r))
            c.close()
        except Exception as e:  # noqa: BLE001 - collected and asserted
            errors.append((n, e))

    in_threads(worker, 8, 480, "HTTPS clients")
    assert not errors, errors[:3]
