"""docs/admin.md "/keys/{key}": the key admin API on the admin listener.

GET /keys/{key} answers one Idempotency-Key's record or lock as JSON (key,
scope, state in_progress|completed|lost, created_at, expires_in_seconds,
fingerprint, status, headers, body_bytes) or 404; DELETE forgets it (204, or
404). The scope is named by Idempotency-Scope-Credential (the credential
value the client sent, hashed like a request's), by ?scope= (the 16 hex
digits an access line shows: a prefix search; or all 64), or is the
anonymous one (?scope=anonymous or neither). admin.token /
IDEMGATE_ADMIN_TOKEN: Bearer token required (401); without one, loopback
peers only (403).

Run on both stores (memory, Redis standalone), and on a Redis Cluster (the
prefix search SCANs every master) and behind a Sentinel. The upstream is a
raw server in this process that counts executions per key and can hold an
answer (a key in progress) or cut one (a lost key, as in test_lost.py)."""

import datetime
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from urllib.parse import quote

import pytest

from idemtest.assertions import assert_in_progress, assert_lost_replay, wait_until
from idemtest.config import gate_config
from idemtest.http import post, post_bytes, raw_closed, read_request, request
from idemtest.procs import (RawServer, free_port, have_ipv6_loopback, non_loopback_ipv4,
                            wait_port)
from idemtest.resp import RespClient, call

CRED = "Bearer k1"  # what post(..., api_key="k1") sends as Authorization
BODY = b'{"amount": 100}'
TTL = 3600
LOCK = 30
FIELDS = {"key", "scope", "state", "created_at", "expires_in_seconds", "fingerprint",
          "status", "headers", "body_bytes"}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FP = re.compile(r"[0-9a-f]{32}")
CUT = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nabc"


def scope_of(cred, secret=None):
    """The full 64-hex scope of a credential (docs/admin.md)."""
    if secret:
        return hmac.new(secret.encode(), cred.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(cred.encode()).hexdigest()


def answer_body(n, key):
    return ('{"n": %d, "key": "%s"}' % (n, key)).encode()


class KeysUpstream(RawServer):
    """Counts executions per (path, key). /hold waits for .release (a key
    in progress meanwhile); /cut cuts its body on the first execution of a
    key (a lost key) and answers in full after; anything else answers 201
    with Content-Type, Location and answer_body(n, key)."""

    def __init__(self):
        self.log = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        super().__init__(self._serve)

    def executions(self, key, path=None):
        with self.lock:
            return sum(1 for p, k in self.log if k == key and (path is None or p == path))

    @staticmethod
    def _read(c, buf):
        """(path, Idempotency-Key) of the next request, or None."""
        req, rest = read_request(c, buf)
        if req is None:
            return None, rest
        _, target, hdrs = req
        return (target.split("?")[0], hdrs.get("idempotency-key")), rest

    def _serve(self, c):
        buf = b""
        try:
            while True:
                req, buf = self._read(c, buf)
                if req is None:
                    return
                path, key = req
                with self.lock:
                    self.log.append((path, key))
                    n = sum(1 for _, k in self.log if k == key)
                if path == "/cut" and n == 1:
                    c.sendall(CUT)
                    c.close()
                    return
                if path == "/hold":
                    self.release.wait(20)
                body = answer_body(n, key)
                c.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                          b"Location: /orders/%d\r\nContent-Length: %d\r\n\r\n%s"
                          % (n, len(body), body))
        except OSError:
            return


@pytest.fixture
def up():
    u = KeysUpstream()
    yield u
    u.release.set()
    u.close()


@pytest.fixture
def gate(idemgate, up, store_cfg):
    """start(idem=None, admin=None, env=None, **top) -> (idemgate, admin port),
    on each store, ttl TTL and lock LOCK unless idem says otherwise."""
    def start(idem=None, admin=None, env=None, **top):
        admin = dict({"listen": "127.0.0.1:%d" % free_port()}, **(admin or {}))
        cfg = gate_config(store_cfg, up.url,
                          dict({"ttl_seconds": TTL, "lock_seconds": LOCK}, **(idem or {})),
                          admin=admin, **top)
        g = idemgate(cfg, env=env)
        host, port = admin["listen"].rsplit(":", 1)
        assert wait_port(int(port), host=host.strip("[]").replace("0.0.0.0", "127.0.0.1"))
        return g, int(port)
    return start


def keys(admin, method, key, cred=None, scope=None, token=None, headers=None):
    """One /keys request: key percent-encoded, ?scope= when given,
    Idempotency-Scope-Credential when cred is given, Authorization: Bearer
    token when token is given."""
    path = "/keys/" + quote(key, safe="")
    if scope is not None:
        path += "?scope=" + scope
    h = list(headers or [])
    if cred is not None:
        h.append(("Idempotency-Scope-Credential", cred))
    if token is not None:
        h.append(("Authorization", "Bearer " + token))
    return request(admin, method, path, h)


def access_line(g, key, outcome=None):
    """The last access line of key (with that outcome), once written."""
    def find():
        found = [ln for ln in g.access_lines() if ln.get("key") == key
                 and (outcome is None or ln.get("outcome") == outcome)]
        return found[-1] if found else None
    assert wait_until(lambda: find() is not None, 5), g.stderr()
    return find()


def assert_json_error(r, status):
    assert r.status == status, r
    assert r.header("Content-Type") == "application/json", r
    doc = r.json()
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    return doc


def assert_key_doc(r, key, scope16, state):
    """The 200 JSON answer of GET /keys: exactly the documented fields."""
    assert r.status == 200, r
    assert r.header("Content-Type") == "application/json", r
    doc = r.json()
    assert set(doc) == FIELDS, doc
    assert doc["key"] == key, doc
    assert doc["scope"] == scope16, doc
    assert doc["state"] == state, doc
    assert isinstance(doc["fingerprint"], str) and FP.fullmatch(doc["fingerprint"]), doc
    return doc


def assert_created_recently(doc):
    assert isinstance(doc["created_at"], str) and ISO.fullmatch(doc["created_at"]), doc
    t = datetime.datetime.strptime(doc["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    t = t.replace(tzinfo=datetime.timezone.utc).timestamp()
    assert time.time() - 60 <= t <= time.time() + 2, doc


def assert_completed(doc, n, key):
    body = answer_body(n, key)
    assert doc["status"] == 201, doc
    assert doc["headers"] == ["Content-Type", "Location"], doc
    assert doc["body_bytes"] == len(body), doc
    assert isinstance(doc["expires_in_seconds"], int), doc
    assert TTL - 60 <= doc["expires_in_seconds"] <= TTL, doc
    assert_created_recently(doc)


# -- both stores ---------------------------------------------------------------


def test_completed_key_found_by_credential_scope16_and_full_scope(gate, up):
    g, admin = gate()
    r = post(g.port, "/orders", "ck-1", BODY)
    assert r.status == 201 and r.body == answer_body(1, "ck-1"), r
    line = access_line(g, "ck-1", "executed")
    scope16 = line["scope"]
    full = scope_of(CRED)
    assert scope16 == full[:16], line
    docs = [
        assert_key_doc(keys(admin, "GET", "ck-1", cred=CRED), "ck-1", scope16, "completed"),
        assert_key_doc(keys(admin, "GET", "ck-1", scope=scope16), "ck-1", scope16, "completed"),
        assert_key_doc(keys(admin, "GET", "ck-1", scope=full), "ck-1", scope16, "completed"),
        # any shorter prefix of the scope is a prefix search too
        assert_key_doc(keys(admin, "GET", "ck-1", scope=full[:4]), "ck-1", scope16, "completed"),
    ]
    for doc in docs:
        assert_completed(doc, 1, "ck-1")
        assert doc == docs[0] or abs(doc["expires_in_seconds"] - docs[0]["expires_in_seconds"]) <= 1
        assert doc["fingerprint"] == docs[0]["fingerprint"], docs
    # another body is another fingerprint
    assert post(g.port, "/orders", "ck-2", b'{"amount": 101}').status == 201
    other = assert_key_doc(keys(admin, "GET", "ck-2", cred=CRED), "ck-2", scope16, "completed")
    assert other["fingerprint"] != docs[0]["fingerprint"], (other, docs[0])
    # looking does not change anything: the key still replays
    r2 = post(g.port, "/orders", "ck-1", BODY)
    assert r2.status == 201 and r2.replayed and r2.body == r.body, r2
    assert up.executions("ck-1") == 1


@pytest.mark.parametrize("how", ["credential", "scope16", "full"])
def test_delete_completed_key_then_it_executes_again(gate, up, how):
    g, admin = gate()
    assert post(g.port, "/orders", "del-1", BODY).status == 201
    scope16 = access_line(g, "del-1")["scope"]
    by = {"credential": {"cred": CRED}, "scope16": {"scope": scope16},
          "full": {"scope": scope_of(CRED)}}[how]
    r = keys(admin, "DELETE", "del-1", **by)
    assert r.status == 204 and r.body == b"", r
    assert_json_error(keys(admin, "GET", "del-1", **by), 404)
    assert_json_error(keys(admin, "DELETE", "del-1", **by), 404)
    # the next request with that key runs again
    r2 = post(g.port, "/orders", "del-1", BODY)
    assert r2.status == 201 and not r2.replayed, r2
    assert r2.body == answer_body(2, "del-1"), r2
    assert up.executions("del-1") == 2
    assert_completed(assert_key_doc(keys(admin, "GET", "del-1", **by), "del-1", scope16,
                                    "completed"), 2, "del-1")
    warns = [ln for ln in g.log_lines() if ln.get("msg", "").startswith("admin: deleted")]
    assert len(warns) == 1 and warns[0]["level"] == "warn", warns
    assert "del-1" in warns[0]["msg"] and "record" in warns[0]["msg"], warns


def test_in_progress_key_and_its_delete(gate, up, store_cfg):
    g, admin = gate()
    first = {}
    t = threading.Thread(target=lambda: first.update(r=post(g.port, "/hold", "ip-1", BODY,
                                                            timeout=30)))
    t.start()
    try:
        assert wait_until(lambda: up.executions("ip-1") == 1, 10)
        assert_in_progress(post(g.port, "/hold", "ip-1", BODY))
        scope16 = scope_of(CRED)[:16]
        for by in ({"cred": CRED}, {"scope": scope16}):
            doc = assert_key_doc(keys(admin, "GET", "ip-1", **by), "ip-1", scope16, "in_progress")
            assert doc["status"] is None and doc["headers"] == [] and doc["body_bytes"] is None, doc
            assert isinstance(doc["expires_in_seconds"], int), doc
            assert 0 < doc["expires_in_seconds"] <= LOCK, doc
            if store_cfg["store"] == "memory":
                assert doc["created_at"] is None, doc  # a lock in the memory store
            else:
                assert_created_recently(doc)
        # a lock may be deleted (docs: only when its owner is gone)
        r = keys(admin, "DELETE", "ip-1", scope=scope16)
        assert r.status == 204, r
        assert_json_error(keys(admin, "GET", "ip-1", cred=CRED), 404)
    finally:
        up.release.set()
        t.join(30)
    # the owner still answers its client, but cannot store the answer
    assert first["r"].status == 201 and not first["r"].replayed, first
    assert first["r"].body == answer_body(1, "ip-1"), first
    assert wait_until(lambda: any("lock no longer ours" in ln.get("msg", "")
                                  for ln in g.log_lines()), 5), g.stderr()
    assert_json_error(keys(admin, "GET", "ip-1", cred=CRED), 404)
    r2 = post(g.port, "/hold", "ip-1", BODY)
    assert r2.status == 201 and not r2.replayed and r2.body == answer_body(2, "ip-1"), r2
    assert up.executions("ip-1") == 2
    warns = [ln for ln in g.log_lines() if ln.get("msg", "").startswith("admin: deleted")]
    assert len(warns) == 1 and "lock" in warns[0]["msg"], warns


def show(r):
    """A response as a curl -i would print it (JSON on one line)."""
    out = ["< HTTP/1.1 %d %s" % (r.status, r.reason)]
    for k, v in r.headers:
        if k.lower() in ("content-type", "www-authenticate", "idempotent-replayed", "location",
                         "allow"):
            out.append("< %s: %s" % (k, v))
    if r.body:
        out.append(r.body.decode("utf-8", "replace").rstrip("\n"))
    return out


def test_lost_key_found_from_its_access_line_and_deleted(gate, up):
    """The issue's transcript: a lost key (its answer was cut) refuses every
    retry with 502 upstream_answer_lost; its access line names it (scope,
    key); GET shows it lost; DELETE frees it and the retry executes."""
    g, admin = gate()
    tr = []
    data, closed = raw_closed(g.port, b"".join(post_bytes("/cut", "lost-1", BODY, host="t")),
                              timeout=10)
    assert data.startswith(b"HTTP/1.1 200") and closed, data
    tr.append("$ curl -i -X POST http://gate/cut -H 'Idempotency-Key: lost-1' "
              "-H 'Authorization: Bearer k1' -d '%s'" % BODY.decode())
    tr.append("< %s   (the body is cut after 3 of 10 bytes)" % data.split(b"\r\n")[0].decode())
    r = post(g.port, "/cut", "lost-1", BODY)
    assert_lost_replay(r)
    tr.append("$ curl -i -X POST http://gate/cut -H 'Idempotency-Key: lost-1' ... (retry)")
    tr.extend(show(r))
    line = access_line(g, "lost-1", "lost")
    tr.append("# its access line:")
    tr.append(json_line(line))
    scope16 = line["scope"]
    url = "/keys/lost-1?scope=" + scope16
    got = keys(admin, "GET", "lost-1", scope=scope16)
    tr.append("$ curl -i http://127.0.0.1:ADMIN%s" % url)
    tr.extend(show(got))
    doc = assert_key_doc(got, "lost-1", scope16, "lost")
    assert 0 < doc["expires_in_seconds"] <= TTL, doc
    assert_created_recently(doc)
    assert up.executions("lost-1") == 1
    d = keys(admin, "DELETE", "lost-1", scope=scope16)
    tr.append("$ curl -i -X DELETE http://127.0.0.1:ADMIN%s" % url)
    tr.extend(show(d))
    assert d.status == 204, d
    gone = keys(admin, "GET", "lost-1", scope=scope16)
    tr.append("$ curl -i http://127.0.0.1:ADMIN%s" % url)
    tr.extend(show(gone))
    assert_json_error(gone, 404)
    r2 = post(g.port, "/cut", "lost-1", BODY)
    tr.append("$ curl -i -X POST http://gate/cut -H 'Idempotency-Key: lost-1' ... (retry)")
    tr.extend(show(r2))
    assert r2.status == 201 and not r2.replayed, r2
    assert r2.body == answer_body(2, "lost-1"), r2
    assert up.executions("lost-1") == 2
    after = keys(admin, "GET", "lost-1", cred=CRED)
    tr.append("$ curl -i http://127.0.0.1:ADMIN/keys/lost-1 "
              "-H 'Idempotency-Scope-Credential: Bearer k1'")
    tr.extend(show(after))
    assert_completed(assert_key_doc(after, "lost-1", scope16, "completed"), 2, "lost-1")
    # shown with pytest -rP (and on failure)
    print("---- transcript (%s store) ----\n%s" % (g.config["store"], "\n".join(tr)))


def json_line(d):
    return json.dumps(d, separators=(",", ":"))


def test_unknown_key_and_wrong_scope_are_404(gate, up):
    g, admin = gate()
    assert post(g.port, "/orders", "ws-1", BODY).status == 201
    mine = scope_of(CRED)
    other = scope_of("Bearer k2")
    assert other[:16] != mine[:16]
    for by in ({"cred": CRED}, {"scope": mine[:16]}, {"scope": mine}, {}):
        assert_json_error(keys(admin, "GET", "nope", **by), 404)
        assert_json_error(keys(admin, "DELETE", "nope", **by), 404)
    for by in ({"cred": "Bearer k2"}, {"cred": "k1"}, {"scope": other[:16]}, {"scope": other},
               {"scope": "anonymous"}, {}):
        assert_json_error(keys(admin, "GET", "ws-1", **by), 404)
        assert_json_error(keys(admin, "DELETE", "ws-1", **by), 404)
    # the key is still there (no wrong-scope DELETE touched it)
    assert keys(admin, "GET", "ws-1", cred=CRED).status == 200
    r = post(g.port, "/orders", "ws-1", BODY)
    assert r.replayed and up.executions("ws-1") == 1, r


def test_anonymous_scope(gate, up):
    g, admin = gate()
    r = post(g.port, "/orders", "an-1", BODY, api_key=None)
    assert r.status == 201, r
    line = access_line(g, "an-1")
    assert line.get("scope") == "anonymous", line
    for by in ({}, {"scope": "anonymous"}):
        doc = assert_key_doc(keys(admin, "GET", "an-1", **by), "an-1", "anonymous", "completed")
        assert_completed(doc, 1, "an-1")
    assert_json_error(keys(admin, "GET", "an-1", cred=CRED), 404)
    assert_json_error(keys(admin, "GET", "an-1", scope=scope_of(CRED)[:16]), 404)
    assert keys(admin, "DELETE", "an-1").status == 204
    assert_json_error(keys(admin, "GET", "an-1", scope="anonymous"), 404)
    r2 = post(g.port, "/orders", "an-1", BODY, api_key=None)
    assert r2.status == 201 and not r2.replayed and up.executions("an-1") == 2, r2


def test_scope_secret_hashes_the_credential(gate, up):
    g, admin = gate({"scope_secret": "s3cret"})
    assert post(g.port, "/orders", "ss-1", BODY).status == 201
    full = scope_of(CRED, "s3cret")
    scope16 = access_line(g, "ss-1")["scope"]
    assert scope16 == full[:16]
    for by in ({"cred": CRED}, {"scope": scope16}, {"scope": full}):
        assert_key_doc(keys(admin, "GET", "ss-1", **by), "ss-1", scope16, "completed")
    assert_json_error(keys(admin, "GET", "ss-1", scope=scope_of(CRED)), 404)  # unkeyed SHA-256


def test_keys_with_reserved_characters(gate, up):
    """A key is percent-encoded in the path; glob characters in it match
    only themselves in a prefix search."""
    g, admin = gate()
    scope16 = scope_of(CRED)[:16]
    for k in ("a/b%c?d#e", "star*", "br[a]ck\\et", "qz"):
        assert post(g.port, "/orders", k, BODY).status == 201, k
        for by in ({"cred": CRED}, {"scope": scope16}):
            assert_key_doc(keys(admin, "GET", k, **by), k, scope16, "completed")
    for pattern in ("q*", "q?", "[q]z", "st*"):
        assert_json_error(keys(admin, "GET", pattern, scope=scope16), 404)
    assert keys(admin, "DELETE", "star*", scope=scope16).status == 204
    assert keys(admin, "GET", "qz", scope=scope16).status == 200


@pytest.mark.parametrize("store_cfg", ["memory", "redis"], indirect=True)
def test_prefix_search_matches_the_whole_key(gate, up, store_cfg):
    """A key containing ':' is not found (nor deleted) by a prefix search
    for its tail: ?scope=<16 hex> with key "dup" names the key "dup", not
    "x:dup"."""
    g, admin = gate()
    scope16 = scope_of(CRED)[:16]
    assert post(g.port, "/orders", "x:dup", BODY).status == 201
    assert_key_doc(keys(admin, "GET", "x:dup", scope=scope16), "x:dup", scope16, "completed")
    r = keys(admin, "GET", "dup", scope=scope16)
    assert r.status == 404, "GET /keys/dup?scope=%s answered %d %r" % (scope16, r.status, r.body)
    r = keys(admin, "DELETE", "dup", scope=scope16)
    assert r.status == 404, "DELETE /keys/dup?scope=%s answered %d" % (scope16, r.status)
    assert keys(admin, "GET", "x:dup", cred=CRED).status == 200
    r = post(g.port, "/orders", "x:dup", BODY)
    assert r.replayed and up.executions("x:dup") == 1, r


def test_expired_key_is_404(gate, up):
    g, admin = gate({"ttl_seconds": 1})
    assert post(g.port, "/orders", "ex-1", BODY).status == 201
    doc = assert_key_doc(keys(admin, "GET", "ex-1", cred=CRED), "ex-1", scope_of(CRED)[:16],
                         "completed")
    assert doc["expires_in_seconds"] == 1, doc
    assert wait_until(lambda: keys(admin, "GET", "ex-1", cred=CRED).status == 404, 5, 0.1)
    assert_json_error(keys(admin, "GET", "ex-1", scope=scope_of(CRED)[:16]), 404)
    assert_json_error(keys(admin, "DELETE", "ex-1", cred=CRED), 404)


def test_credential_of_another_scope_header(gate, up):
    """The credential is the value of whichever scope header the client
    sent (X-API-Key here, without Authorization)."""
    g, admin = gate()
    r = post(g.port, "/orders", "xk-1", BODY, api_key=None, extra=[("X-API-Key", "abc123")])
    assert r.status == 201, r
    scope16 = access_line(g, "xk-1")["scope"]
    assert scope16 == scope_of("abc123")[:16]
    assert_key_doc(keys(admin, "GET", "xk-1", cred="abc123"), "xk-1", scope16, "completed")
    assert_json_error(keys(admin, "GET", "xk-1", cred="X-API-Key: abc123"), 404)
    assert keys(admin, "DELETE", "xk-1", cred="abc123").status == 204


@pytest.mark.parametrize("store_cfg", ["redis"], indirect=True)
def test_redis_key_prefix_with_glob_characters(gate, up, redis, store_cfg):
    """redis.key_prefix is matched literally by the prefix search."""
    g, admin = gate(redis={"url": redis.url, "key_prefix": "a*b?[c]\\:"})
    assert post(g.port, "/orders", "kp-1", BODY).status == 201
    names = call(redis.port, "KEYS", "*")
    assert names == [("a*b?[c]\\:{%s:kp-1}" % scope_of(CRED)).encode()], names
    scope16 = scope_of(CRED)[:16]
    assert_key_doc(keys(admin, "GET", "kp-1", scope=scope16), "kp-1", scope16, "completed")
    assert keys(admin, "DELETE", "kp-1", scope=scope16).status == 204
    assert call(redis.port, "DBSIZE") == 0


# -- auth ----------------------------------------------------------------------


def check_token(g, admin, token):
    assert post(g.port, "/orders", "tok-1", BODY).status == 201
    r = keys(admin, "GET", "tok-1", cred=CRED)
    assert_json_error(r, 401)
    assert r.header("WWW-Authenticate") == "Bearer", r
    for bad in ([("Authorization", "Bearer wrong")], [("Authorization", "Bearer " + token + "x")],
                [("Authorization", "Bearer " + token[:-1])], [("Authorization", token)],
                [("Authorization", "Basic " + token)], [("Authorization", "bearer  " + token)]):
        r = keys(admin, "GET", "tok-1", cred=CRED, headers=bad)
        assert_json_error(r, 401)
        assert r.header("WWW-Authenticate") == "Bearer", r
        # a DELETE without the right token deletes nothing
        assert_json_error(keys(admin, "DELETE", "tok-1", cred=CRED, headers=bad), 401)
    assert_json_error(keys(admin, "DELETE", "tok-1", cred=CRED), 401)
    doc = assert_key_doc(keys(admin, "GET", "tok-1", cred=CRED, token=token), "tok-1",
                         scope_of(CRED)[:16], "completed")
    assert_completed(doc, 1, "tok-1")
    # the probes and /metrics never need it
    for path in ("/healthz", "/readyz", "/metrics"):
        assert request(admin, "GET", path).status == 200, path
        assert request(admin, "GET", path, [("Authorization", "Bearer wrong")]).status == 200
    assert keys(admin, "DELETE", "tok-1", cred=CRED, token=token).status == 204
    assert keys(admin, "GET", "tok-1", cred=CRED, token=token).status == 404


@pytest.mark.parametrize("store_cfg", ["memory"], indirect=True)
def test_admin_token_in_config(gate, store_cfg):
    g, admin = gate(admin={"token": "t0ken-xyz"})
    check_token(g, admin, "t0ken-xyz")


@pytest.mark.parametrize("store_cfg", ["memory"], indirect=True)
def test_admin_token_from_env(gate, store_cfg):
    g, admin = gate(env={"IDEMGATE_ADMIN_TOKEN": "env-t0ken"})
    check_token(g, admin, "env-t0ken")


@pytest.mark.parametrize("store_cfg", ["memory"], indirect=True)
def test_admin_token_env_overrides_config(gate, store_cfg):
    g, admin = gate(admin={"token": "file-token"}, env={"IDEMGATE_ADMIN_TOKEN": "env-t0ken"})
    check_token(g, admin, "env-t0ken")


@pytest.mark.parametrize("store_cfg", ["memory"], indirect=True)
def test_without_token_only_loopback_peers(gate, store_cfg):
    """Without admin.token /keys answers loopback peers and 403 to others
    (a peer on another address of this host is not loopback); the probes
    answer everyone. Skipped where the host has no address but loopback."""
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address: a non-loopback peer cannot be made")
    port = free_port()
    g, _ = gate(admin={"listen": "0.0.0.0:%d" % port})
    assert post(g.port, "/orders", "lb-1", BODY).status == 201
    assert keys(port, "GET", "lb-1", cred=CRED).status == 200  # from 127.0.0.1
    path = "/keys/lb-1"
    h = [("Idempotency-Scope-Credential", CRED)]
    r = request(port, "GET", path, h, host=addr)
    assert_json_error(r, 403)
    assert_json_error(request(port, "DELETE", path, h, host=addr), 403)
    assert keys(port, "GET", "lb-1", cred=CRED).status == 200  # not deleted
    for p in ("/healthz", "/readyz", "/metrics"):
        assert request(port, "GET", p, host=addr).status == 200, p


@pytest.mark.parametrize("store_cfg", ["memory"], indirect=True)
def test_token_admits_non_loopback_peers(gate, store_cfg):
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address: a non-loopback peer cannot be made")
    port = free_port()
    g, _ = gate(admin={"listen": "0.0.0.0:%d" % port, "token": "tk"})
    assert post(g.port, "/orders", "lb-2", BODY).status == 201
    h = [("Idempotency-Scope-Credential", CRED)]
    assert_json_error(request(port, "GET", "/keys/lb-2", h, host=addr), 401)
    r = request(port, "GET", "/keys/lb-2", h + [("Authorization", "Bearer tk")], host=addr)
    assert r.status == 200 and r.json()["state"] == "completed", r


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no ::1")
@pytest.mark.parametrize("store_cfg", ["memory"], indirect=True)
def test_ipv6_loopback_peer_is_loopback(gate, store_cfg):
    port = free_port()
    g, _ = gate(admin={"listen": "[::1]:%d" % port})
    assert post(g.port, "/orders", "v6-1", BODY).status == 201
    r = request(port, "GET", "/keys/v6-1", [("Idempotency-Scope-Credential", CRED)], host="::1")
    assert r.status == 200, r


# -- bad input -----------------------------------------------------------------


@pytest.mark.parametrize("store_cfg", ["memory"], indirect=True)
def test_bad_keys_and_scopes_are_400(gate, store_cfg):
    g, admin = gate()
    assert keys(admin, "GET", "a" * 255).status == 404  # the longest key: valid
    assert_json_error(keys(admin, "GET", "a" * 256), 400)
    assert_json_error(keys(admin, "DELETE", "a" * 256), 400)
    assert_json_error(request(admin, "GET", "/keys/a" + "b" * 1000), 400)
    for raw in ("/keys/a%20b", "/keys/a%00b", "/keys/%7f", "/keys/%c3%a9"):
        assert_json_error(request(admin, "GET", raw), 400)
    scope = scope_of(CRED)
    for bad in ("zz", "g" + scope[1:16], scope + "0", "0" * 65, "", "-1", "anonymous2",
                scope[:16] + "*"):
        r = keys(admin, "GET", "k", scope=quote(bad, safe=""))
        assert_json_error(r, 400)
        assert_json_error(keys(admin, "DELETE", "k", scope=quote(bad, safe="")), 400)


@pytest.mark.parametrize("store_cfg", ["memory"], indirect=True)
@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH"])
def test_other_methods_are_405(gate, store_cfg, method):
    g, admin = gate()
    r = request(admin, method, "/keys/k", body=b"{}")
    assert_json_error(r, 405)
    assert r.header("Allow") == "GET, DELETE", r


# -- Redis: unavailable, cluster, sentinel --------------------------------------


def test_redis_down_is_503(idemgate, up, redis):
    port = free_port()
    g = idemgate(gate_config({"store": "redis", "redis": {"url": redis.url, "timeout_ms": 300}},
                             up.url, {"ttl_seconds": TTL},
                             admin={"listen": "127.0.0.1:%d" % port}))
    assert wait_port(port)
    assert post(g.port, "/orders", "rd-1", BODY).status == 201
    assert keys(port, "GET", "rd-1", scope=scope_of(CRED)[:16]).status == 200
    redis.kill()
    for by in ({"cred": CRED}, {"scope": scope_of(CRED)[:16]}):
        t0 = time.monotonic()
        assert_json_error(keys(port, "GET", "rd-1", **by), 503)
        assert time.monotonic() - t0 < 5


def redis_key(scope, key):
    return "idem:{%s:%s}" % (scope, key)


def test_cluster_finds_keys_by_scope16_on_every_master(idemgate, up, redis_servers):
    nodes = redis_servers.start_cluster(3)
    port = free_port()
    g = idemgate(gate_config({"store": "redis",
                              "redis": {"mode": "cluster",
                                        "nodes": ["127.0.0.1:%d" % p for p in nodes]}},
                             up.url, {"ttl_seconds": TTL},
                             admin={"listen": "127.0.0.1:%d" % port}))
    assert wait_port(port)
    names = ["cl-%d" % i for i in range(24)]
    for k in names:
        assert post(g.port, "/orders", k, BODY).status == 201, k
    full = scope_of(CRED)
    scope16 = access_line(g, names[0])["scope"]
    assert scope16 == full[:16]
    held = {}
    for p in nodes:
        with RespClient(p) as c:
            held[p] = [x.decode() for x in c.keys()]
    assert all(held[p] for p in nodes), held  # every master holds some
    assert sum(len(v) for v in held.values()) == len(names), held
    for k in names:
        assert_completed(assert_key_doc(keys(port, "GET", k, scope=scope16), k, scope16,
                                        "completed"), 1, k)
    assert_json_error(keys(port, "GET", "cl-none", scope=scope16), 404)  # scanned all three
    # one key of each master, deleted by its 16 digits
    for p in nodes:
        rk = held[p][0]
        k = rk.split(":", 2)[2][:-1]  # idem:{<scope>:<key>}
        assert rk == redis_key(full, k)
        assert keys(port, "DELETE", k, scope=scope16).status == 204, k
        assert call(p, "EXISTS", rk) == 0
        assert_json_error(keys(port, "GET", k, scope=scope16), 404)
        r = post(g.port, "/orders", k, BODY)
        assert r.status == 201 and not r.replayed and up.executions(k) == 2, r
    assert sum(call(p, "DBSIZE") for p in nodes) == len(names)


def test_sentinel_finds_a_key_by_scope16_and_deletes_it(idemgate, up, redis_servers):
    mp, rp = free_port(), free_port()
    redis_servers.start(mp)
    redis_servers.start(rp, ["--replicaof", "127.0.0.1", mp])
    sent = redis_servers.start_sentinel(mp)
    port = free_port()
    g = idemgate(gate_config({"store": "redis",
                              "redis": {"mode": "sentinel", "master_name": "m",
                                        "nodes": ["127.0.0.1:%d" % sent]}},
                             up.url, {"ttl_seconds": TTL},
                             admin={"listen": "127.0.0.1:%d" % port}))
    assert wait_port(port)
    for k in ("se-1", "se-2", "se-3"):
        assert post(g.port, "/orders", k, BODY).status == 201
    scope16 = access_line(g, "se-2")["scope"]
    doc = assert_key_doc(keys(port, "GET", "se-2", scope=scope16), "se-2", scope16, "completed")
    assert_completed(doc, 1, "se-2")
    assert keys(port, "DELETE", "se-2", scope=scope16).status == 204
    assert call(mp, "EXISTS", redis_key(scope_of(CRED), "se-2")) == 0
    assert call(mp, "DBSIZE") == 2
    assert_json_error(keys(port, "GET", "se-2", cred=CRED), 404)
    r = post(g.port, "/orders", "se-2", BODY)
    assert r.status == 201 and not r.replayed and up.executions("se-2") == 2, r
