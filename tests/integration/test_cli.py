"""Command line and configuration (docs/configuration.md), end to end:
flags, -t, exit codes, one-line config errors naming the key, precedence
defaults < file < env < flags, bind failure."""

import http.server
import json
import os
import re
import socket
import threading

import pytest

from idemtest.config import merge
from idemtest.http import hdrs, request
from idemtest.procs import (REPO, free_port, have_ipv6_loopback, idemgate_bin,
                            port_open, run_idemgate, wait_port)

ALL_FLAGS = ["-c", "--config", "--listen", "--upstream", "--store", "--redis",
             "--workers", "--admin", "-t", "--test-config", "-T",
             "--dump-config", "--version",
             "-h", "--help", "--healthcheck"]


@pytest.fixture(autouse=True)
def need_binary():
    if not os.path.exists(idemgate_bin()):
        pytest.fail("idemgate binary not found at %s" % idemgate_bin())


def write_config(tmp_path, cfg, name="cfg.json"):
    p = tmp_path / name
    if isinstance(cfg, str):
        p.write_text(cfg)
    else:
        p.write_text(json.dumps(cfg))
    return str(p)


def good_config():
    return {"listen": "127.0.0.1:%d" % free_port(), "store": "memory",
            "upstream": "http://127.0.0.1:9", "workers": 1,
            "admin": {"listen": "off"}}


def stderr_lines(res):
    return [ln for ln in res.stderr.splitlines() if ln.strip()]


def assert_config_error(res, key_path):
    """Exit 2 with exactly one stderr line, starting with "config:" and
    naming key_path."""
    lines = stderr_lines(res)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1, "expected one stderr line, got %r" % res.stderr
    assert lines[0].startswith("config:"), lines[0]
    if key_path:
        assert key_path in lines[0], (key_path, lines[0])
    return lines[0]


def check_bad(tmp_path, patch, key_path, test_only=True):
    path = write_config(tmp_path, merge(good_config(), patch))
    args = ["-c", path] + (["-t"] if test_only else [])
    res = run_idemgate(args, timeout=10)
    return assert_config_error(res, key_path)


# -- flags ----------------------------------------------------------------


def test_version_prints_version_and_exits_0():
    res = run_idemgate(["--version"])
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert re.search(r"\d+\.\d+", out), out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_and_mentions_every_flag(flag):
    res = run_idemgate([flag])
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    for f in ALL_FLAGS:
        assert re.search(r"(^|[\s,\[])%s\b" % re.escape(f), out), \
            "help does not mention %s:\n%s" % (f, out)


def test_test_config_valid_prints_ok(tmp_path):
    path = write_config(tmp_path, good_config())
    res = run_idemgate(["-c", path, "-t"])
    assert res.returncode == 0, res.stderr
    assert "configuration ok" in res.stdout + res.stderr


def test_test_config_long_flag(tmp_path):
    path = write_config(tmp_path, good_config())
    res = run_idemgate(["--config", path, "--test-config"])
    assert res.returncode == 0, res.stderr
    assert "configuration ok" in res.stdout + res.stderr


def test_test_config_without_file_uses_defaults():
    res = run_idemgate(["-t"])
    assert res.returncode == 0, res.stderr
    assert "configuration ok" in res.stdout + res.stderr


def test_repo_config_passes_test_config():
    path = os.path.join(REPO, "config", "idemgate.json")
    assert os.path.exists(path), "config/idemgate.json missing in the repo"
    res = run_idemgate(["-c", path, "-t"])
    assert res.returncode == 0, res.stderr
    assert "configuration ok" in res.stdout + res.stderr


def test_unknown_flag_exits_2():
    res = run_idemgate(["--no-such-flag"])
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "--no-such-flag" in res.stderr or "no-such-flag" in res.stderr
    assert len(stderr_lines(res)) >= 1


def test_bad_flag_value_exits_2(tmp_path):
    path = write_config(tmp_path, good_config())
    res = run_idemgate(["-c", path, "--store", "mysql", "-t"])
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "store" in res.stderr


def test_missing_flag_argument_exits_2():
    res = run_idemgate(["--listen"])
    assert res.returncode == 2, (res.returncode, res.stderr)


def test_missing_config_file_exits_2(tmp_path):
    res = run_idemgate(["-c", str(tmp_path / "nope.json"), "-t"])
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(stderr_lines(res)) == 1, res.stderr


# -- bad configs: exit 2, one line naming the key --------------------------


def test_unknown_top_level_key(tmp_path):
    line = check_bad(tmp_path, {"foo": 1}, "foo")
    assert "unknown" in line.lower()


def test_unknown_nested_key(tmp_path):
    line = check_bad(tmp_path, {"idempotency": {"lock_secondz": 30}},
                     "idempotency.lock_secondz")
    assert "unknown" in line.lower()


def test_unknown_key_also_fails_without_t(tmp_path):
    check_bad(tmp_path, {"limits": {"max_conections": 5}},
              "limits.max_conections", test_only=False)


def test_wrong_type_string_for_integer(tmp_path):
    check_bad(tmp_path, {"idempotency": {"lock_seconds": "30"}},
              "idempotency.lock_seconds")


def test_wrong_type_bool_for_list(tmp_path):
    check_bad(tmp_path, {"idempotency": {"methods": True}},
              "idempotency.methods")


def test_wrong_type_object_for_string(tmp_path):
    check_bad(tmp_path, {"upstream": {"url": "http://127.0.0.1:9"}},
              "upstream")


def test_wrong_type_list_element(tmp_path):
    check_bad(tmp_path, {"idempotency": {"scope_headers": ["Authorization", 5]}},
              "idempotency.scope_headers")


def test_out_of_range_lock_seconds(tmp_path):
    check_bad(tmp_path, {"idempotency": {"lock_seconds": 0}},
              "idempotency.lock_seconds")


def test_out_of_range_mismatch_status(tmp_path):
    check_bad(tmp_path, {"idempotency": {"mismatch_status": 500}},
              "idempotency.mismatch_status")


def test_out_of_range_negative_workers(tmp_path):
    check_bad(tmp_path, {"workers": -1}, "workers")


def test_bad_enum_store(tmp_path):
    check_bad(tmp_path, {"store": "mysql"}, "store")


def test_bad_enum_failure_mode(tmp_path):
    check_bad(tmp_path, {"redis": {"failure_mode": "maybe"}},
              "redis.failure_mode")


def test_bad_upstream_url_scheme(tmp_path):
    check_bad(tmp_path, {"upstream": "ftp://127.0.0.1:9000"}, "upstream")


def test_bad_upstream_url_garbage(tmp_path):
    check_bad(tmp_path, {"upstream": "not a url"}, "upstream")


def test_bad_redis_url(tmp_path):
    check_bad(tmp_path, {"redis": {"url": "http://127.0.0.1:6379"}},
              "redis.url")


def test_bad_route_upstream_url(tmp_path):
    check_bad(tmp_path, {"routes": [{"prefix": "/a", "upstream": "gopher://x"}]},
              "routes")


def test_bad_listen_no_port(tmp_path):
    check_bad(tmp_path, {"listen": "127.0.0.1"}, "listen")


def test_bad_listen_port_out_of_range(tmp_path):
    check_bad(tmp_path, {"listen": "127.0.0.1:99999"}, "listen")


def test_bad_admin_listen(tmp_path):
    check_bad(tmp_path, {"admin": {"listen": "localhost:abc"}}, "admin.listen")


def test_invalid_json(tmp_path):
    path = write_config(tmp_path, '{"listen": "127.0.0.1:8080",, }')
    res = run_idemgate(["-c", path, "-t"])
    assert_config_error(res, None)


def test_top_level_not_object(tmp_path):
    path = write_config(tmp_path, '[1, 2]')
    res = run_idemgate(["-c", path, "-t"])
    assert_config_error(res, None)


def test_bad_unknown_outcome(tmp_path):
    check_bad(tmp_path, {"idempotency": {"unknown_outcome": "forget"}},
              "idempotency.unknown_outcome")


def test_unknown_outcome_keep_is_ok(tmp_path):
    cfg = good_config()
    cfg["idempotency"] = {"unknown_outcome": "keep"}
    cfg["routes"] = [{"prefix": "/a",
                      "idempotency": {"unknown_outcome": "release"}}]
    res = run_idemgate(["-c", write_config(tmp_path, cfg), "-t"])
    assert res.returncode == 0, res.stderr


# -- cross-checks (docs/configuration.md) ----------------------------------------


def test_cross_redis_timeout_vs_lock_seconds(tmp_path):
    line = check_bad(tmp_path, {"store": "redis",
                                "redis": {"timeout_ms": 1000},
                                "idempotency": {"lock_seconds": 1}},
                     "redis.timeout_ms")
    assert "lock_seconds" in line, line


def test_cross_redis_timeout_vs_route_lock_seconds(tmp_path):
    check_bad(tmp_path, {"store": "redis",
                         "redis": {"timeout_ms": 4000},
                         "routes": [{"prefix": "/a"},
                                    {"prefix": "/b",
                                     "idempotency": {"lock_seconds": 6}}]},
              "routes[1].idempotency.lock_seconds")


def test_cross_timeout_fits_or_memory_store(tmp_path):
    for patch in ({"store": "redis", "redis": {"timeout_ms": 666},
                   "idempotency": {"lock_seconds": 1}},
                  {"store": "memory", "idempotency": {"lock_seconds": 1}}):
        cfg = dict(good_config(), **patch)
        res = run_idemgate(["-c", write_config(tmp_path, cfg), "-t"])
        assert res.returncode == 0, (patch, res.stderr)


def test_cross_required_with_empty_methods(tmp_path):
    check_bad(tmp_path, {"idempotency": {"required": True, "methods": []}},
              "idempotency.required")
    check_bad(tmp_path, {"routes": [{"prefix": "/a", "idempotency":
                                     {"required": True, "methods": []}}]},
              "routes[0].idempotency.required")


@pytest.mark.parametrize("name", ["Content-Length", "connection", "TE",
                                  "Transfer-Encoding", "Proxy-Authorization",
                                  "Upgrade", "Keep-Alive", "Trailer"])
def test_cross_key_header_not_hop_by_hop(tmp_path, name):
    check_bad(tmp_path, {"idempotency": {"header": name}},
              "idempotency.header")


def test_cross_scope_headers_not_hop_by_hop(tmp_path):
    check_bad(tmp_path, {"idempotency": {"scope_headers": ["Connection"]}},
              "idempotency.scope_headers[0]")
    check_bad(tmp_path, {"routes": [{"prefix": "/a", "idempotency":
                                     {"scope_headers": ["X-Key", "proxy-x"]}}]},
              "routes[0].idempotency.scope_headers[1]")


def test_shipped_configs_pass_test_config():
    for name in ("idemgate.json", "sidecar.json", "gateway.json", "container.json"):
        res = run_idemgate(["-c", os.path.join(REPO, "config", name), "-t"])
        assert res.returncode == 0, (name, res.stderr)


def test_bad_env_value_exits_2(tmp_path):
    path = write_config(tmp_path, good_config())
    res = run_idemgate(["-c", path, "-t"], env={"IDEMGATE_WORKERS": "many"})
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(stderr_lines(res)) == 1, res.stderr
    assert "IDEMGATE_WORKERS" in res.stderr


# -- precedence: defaults < file < env < flags -----------------------------


def _cfg_for(upstream, port):
    return {"listen": "127.0.0.1:%d" % port, "store": "memory",
            "upstream": upstream.url, "workers": 1, "admin": {"listen": "off"}}


def test_listen_precedence_flag_wins(idemgate, upstream):
    a, b, c = free_port(), free_port(), free_port()
    g = idemgate(_cfg_for(upstream, a),
                 args=["--listen", "127.0.0.1:%d" % c],
                 env={"IDEMGATE_LISTEN": "127.0.0.1:%d" % b})
    assert g.port == c
    assert request(c, "GET", "/echo").status == 200
    assert not port_open(a)
    assert not port_open(b)


def test_listen_precedence_env_over_file(idemgate, upstream):
    a, b = free_port(), free_port()
    g = idemgate(_cfg_for(upstream, a),
                 env={"IDEMGATE_LISTEN": "127.0.0.1:%d" % b})
    assert g.port == b
    assert request(b, "GET", "/echo").status == 200
    assert not port_open(a)


def test_listen_from_file(idemgate, upstream):
    a = free_port()
    g = idemgate(_cfg_for(upstream, a))
    assert g.port == a
    assert request(a, "GET", "/echo").status == 200


def test_upstream_precedence(idemgate, upstream, upstream2):
    """file upstream < env IDEMGATE_UPSTREAM < --upstream flag."""
    cfg = _cfg_for(upstream, free_port())
    cfg["upstream"] = "http://127.0.0.1:%d" % free_port()  # nothing there
    g = idemgate(cfg, env={"IDEMGATE_UPSTREAM": upstream.url})
    r = request(g.port, "GET", "/echo")
    assert r.status == 200 and r.json()["port"] == upstream.port
    g.stop()

    g2 = idemgate(cfg, env={"IDEMGATE_UPSTREAM": upstream.url},
                  args=["--upstream", upstream2.url])
    r = request(g2.port, "GET", "/echo")
    assert r.status == 200 and r.json()["port"] == upstream2.port


def test_store_flag_overrides_file(idemgate, upstream):
    """File says redis at a dead address; --store memory makes it work."""
    cfg = _cfg_for(upstream, free_port())
    cfg["store"] = "redis"
    cfg["redis"] = {"url": "redis://127.0.0.1:%d/0" % free_port(),
                    "timeout_ms": 200}
    g = idemgate(cfg, args=["--store", "memory"])
    r = request(g.port, "POST", "/count", hdrs("p1"),
                       b"{}")
    assert r.status == 201, r
    r2 = request(g.port, "POST", "/count", hdrs("p1"),
                        b"{}")
    assert r2.status == 201
    assert r2.header("Idempotent-Replayed") == "true"
    assert upstream.count("p1") == 1


# -- runtime failures -------------------------------------------------------


def test_cannot_bind_exits_1(tmp_path):
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    port = holder.getsockname()[1]
    try:
        cfg = good_config()
        cfg["listen"] = "127.0.0.1:%d" % port
        path = write_config(tmp_path, cfg)
        res = run_idemgate(["-c", path])
        assert res.returncode == 1, (res.returncode, res.stderr)
        assert res.stderr.strip(), "no error message on stderr"
    finally:
        holder.close()


def test_sigterm_idle_exits_0(idemgate, upstream):
    g = idemgate(_cfg_for(upstream, free_port()))
    assert request(g.port, "GET", "/echo").status == 200
    assert g.stop() == 0


def test_sigint_idle_exits_0(idemgate, upstream):
    import signal
    g = idemgate(_cfg_for(upstream, free_port()))
    assert g.stop(sig=signal.SIGINT) == 0


# -- --healthcheck [ADDR] (docs/configuration.md) ---------------------------------


def admin_gate(idemgate, upstream, host="127.0.0.1"):
    port = free_port()
    listen = ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
    g = idemgate({"store": "memory", "upstream": upstream.url,
                  "admin": {"listen": listen}})
    assert wait_port(port, 10, host=host), "admin listener not up"
    return g, listen


def assert_unhealthy(res, *words):
    lines = stderr_lines(res)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("healthcheck:"), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_healthcheck_addr_of_a_running_idemgate(idemgate, upstream):
    g, listen = admin_gate(idemgate, upstream)
    for args in (["--healthcheck", listen], ["--healthcheck=" + listen]):
        res = run_idemgate(args)
        assert res.returncode == 0, (args, res.stderr)
        assert res.stderr == "", res.stderr


def test_healthcheck_configured_admin_listener(idemgate, upstream):
    g, listen = admin_gate(idemgate, upstream)
    res = run_idemgate(["-c", g.config_path, "--healthcheck"])
    assert res.returncode == 0, res.stderr
    # the environment and flags choose admin.listen as usual
    res = run_idemgate(["--healthcheck"], env={"IDEMGATE_ADMIN_LISTEN": listen})
    assert res.returncode == 0, res.stderr
    res = run_idemgate(["--admin", listen, "--healthcheck"])
    assert res.returncode == 0, res.stderr


def test_healthcheck_ipv6(idemgate, upstream):
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    g, listen = admin_gate(idemgate, upstream, host="::1")
    res = run_idemgate(["--healthcheck", listen])
    assert res.returncode == 0, res.stderr


def test_healthcheck_closed_port():
    res = run_idemgate(["--healthcheck", "127.0.0.1:%d" % free_port()])
    assert_unhealthy(res, "cannot connect")


def test_healthcheck_admin_off(tmp_path):
    res = run_idemgate(["-c", write_config(tmp_path, good_config()),
                        "--healthcheck"])
    assert_unhealthy(res, "off")


def test_healthcheck_bad_config_or_addr(tmp_path):
    res = run_idemgate(["-c", write_config(tmp_path, {"listen": 1}),
                        "--healthcheck"])
    assert_unhealthy(res, "config: listen")
    assert_unhealthy(run_idemgate(["--healthcheck", "no-port"]), "no-port")


class _Answer503(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        body = b"not ready\n"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_healthcheck_other_status_is_unhealthy():
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Answer503)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        res = run_idemgate(["--healthcheck", "127.0.0.1:%d" % srv.server_port])
        assert_unhealthy(res, "503")
    finally:
        srv.shutdown()
        srv.server_close()


def test_healthcheck_silent_server_times_out():
    """A listener that accepts but never answers: exit 1 after the
    healthcheck's own timeout (a couple of seconds), not a hang."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    try:
        res = run_idemgate(["--healthcheck",
                            "127.0.0.1:%d" % holder.getsockname()[1]],
                           timeout=30)
        assert_unhealthy(res, "no answer")
    finally:
        holder.close()


# -- -t loads the client-facing TLS certificate and key ---------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    from idemtest.certs import make_certs
    return make_certs(str(tmp_path_factory.mktemp("cli-tls")))


def check_tls(tmp_path, cert, key):
    return check_bad(tmp_path, {"tls": {"cert_file": cert, "key_file": key}},
                     None)


def test_test_config_missing_cert(tmp_path, tls_files):
    missing = str(tmp_path / "missing.crt")
    assert check_tls(tmp_path, missing, tls_files.key) == \
        "config: tls.cert_file: cannot load %s: No such file or directory" % missing


def test_test_config_missing_key(tmp_path, tls_files):
    missing = str(tmp_path / "missing.key")
    assert check_tls(tmp_path, tls_files.cert, missing) == \
        "config: tls.key_file: cannot load %s: No such file or directory" % missing


def test_test_config_cert_not_pem(tmp_path, tls_files):
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    line = check_tls(tmp_path, str(junk), tls_files.key)
    assert line.startswith("config: tls.cert_file: cannot load %s: " % junk), line


def test_test_config_mismatched_pair(tmp_path, tls_files):
    # the CA's certificate with the server's key
    assert check_tls(tmp_path, tls_files.ca, tls_files.key) == \
        "config: tls.key_file: %s does not match the certificate in %s" % (
            tls_files.key, tls_files.ca)


def test_test_config_good_pair(tmp_path, tls_files):
    cfg = merge(good_config(), {"tls": {"cert_file": tls_files.cert,
                                        "key_file": tls_files.key}})
    res = run_idemgate(["-c", write_config(tmp_path, cfg), "-t"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "configuration ok"


# -- -T prints the effective configuration ------------------------------------


def dump(args, env=None):
    res = run_idemgate(list(args) + ["-T"], env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    return res.stdout, json.loads(res.stdout)


def test_dump_defaults_round_trip(tmp_path):
    text, cfg = dump([])
    assert cfg["listen"] == "0.0.0.0:8080"
    assert cfg["store"] == "redis"
    assert cfg["redis"]["url"] == "redis://127.0.0.1:6379/0"
    assert cfg["redis"]["tls"]["verify"] is True
    assert cfg["idempotency"]["key_max_length"] == 255
    assert cfg["idempotency"]["methods"] == ["POST", "PATCH"]
    assert cfg["limits"]["max_request_body_bytes"] == 10485760
    assert cfg["admin"]["listen"] == "127.0.0.1:9091"
    assert cfg["routes"] == []
    assert isinstance(cfg["workers"], int) and cfg["workers"] >= 1  # resolved
    # no secrets: the text loads as it is, and dumps the same again
    path = write_config(tmp_path, text, "dumped.json")
    res = run_idemgate(["-c", path, "-t"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "configuration ok"
    assert dump(["-c", path])[0] == text


def test_dump_merges_file_env_flags(tmp_path):
    a, b, c = free_port(), free_port(), free_port()
    path = write_config(tmp_path, {
        "listen": "127.0.0.1:%d" % a, "upstream": "http://127.0.0.1:9001",
        "store": "memory", "workers": 1,
        "idempotency": {"ttl_seconds": 60, "lock_seconds": 10},
        "admin": {"listen": "off"},
        "routes": [{"prefix": "/v1", "idempotency": {"ttl_seconds": 5}},
                   {"prefix": "/v2"}]})
    env = {"IDEMGATE_LISTEN": "127.0.0.1:%d" % b,
           "IDEMGATE_UPSTREAM": "http://127.0.0.1:9002",
           "IDEMPOTENCY_TTL_SECONDS": "120", "IDEMGATE_LOG_LEVEL": "warn"}
    text, cfg = dump(["-c", path, "--listen", "127.0.0.1:%d" % c,
                      "--workers", "2"], env=env)
    assert cfg["listen"] == "127.0.0.1:%d" % c          # flag > env > file
    assert cfg["upstream"] == "http://127.0.0.1:9002"    # env > file
    assert cfg["workers"] == 2                           # flag > file
    assert cfg["store"] == "memory"                      # file > default
    assert cfg["admin"]["listen"] == "off"
    assert cfg["log"]["level"] == "warn"                 # env > default
    assert cfg["idempotency"]["ttl_seconds"] == 120      # env > file
    assert cfg["idempotency"]["lock_seconds"] == 10      # file
    routes = {r["prefix"]: r for r in cfg["routes"]}
    # routes resolved: the global values after env, their own overrides
    assert routes["/v1"]["idempotency"]["ttl_seconds"] == 5
    assert routes["/v2"]["idempotency"]["ttl_seconds"] == 120
    assert routes["/v2"]["idempotency"]["lock_seconds"] == 10
    # a route without its own upstream uses the default group: none printed
    assert "upstream" not in routes["/v2"]
    assert routes["/v1"]["idempotency"]["enabled"] is True
    # the merged text alone (no env, no flags) is the same configuration
    again = write_config(tmp_path, text, "merged.json")
    assert dump(["-c", again])[0] == text


def test_dump_redacts_secrets(tmp_path):
    path = write_config(tmp_path, merge(good_config(), {
        "store": "redis", "idempotency": {"scope_secret": "file-hmac-key"}}))
    res = run_idemgate(["-c", path, "--redis",
                        "redis://app:hunter2@127.0.0.1:6390/1", "-T"],
                       env={"IDEMGATE_SCOPE_SECRET": "env-hmac-key"})
    assert res.returncode == 0, res.stderr
    for secret in ("hunter2", "file-hmac-key", "env-hmac-key"):
        assert secret not in res.stdout
    cfg = json.loads(res.stdout)
    assert cfg["redis"]["url"] == "redis://app:<redacted>@127.0.0.1:6390/1"
    assert cfg["idempotency"]["scope_secret"] == "<redacted>"
    # loaded as printed it is refused (a wrong secret would split scopes)
    dumped = write_config(tmp_path, res.stdout, "redacted.json")
    res2 = run_idemgate(["-c", dumped, "-t"])
    assert_config_error(res2, "redis.url")
    assert "redacted" in res2.stderr
    # with the secrets put back it loads
    restored = json.loads(res.stdout)
    restored["redis"]["url"] = "redis://app:hunter2@127.0.0.1:6390/1"
    restored["idempotency"]["scope_secret"] = "env-hmac-key"
    res3 = run_idemgate(["-c", write_config(tmp_path, restored, "r.json"), "-t"])
    assert res3.returncode == 0, res3.stderr


def test_dump_of_a_bad_config_is_the_config_error(tmp_path):
    path = write_config(tmp_path, merge(good_config(),
                                        {"idempotency": {"lock_seconds": 0}}))
    res = run_idemgate(["-c", path, "-T"])
    assert_config_error(res, "idempotency.lock_seconds")
    assert res.stdout == ""
