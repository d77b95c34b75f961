"""Receiving webhooks (docs/webhooks.md): a route's
`webhook` object verifies every delivery and takes the idempotency key
from it, so a sender's redeliveries execute the consumer once.

Deliveries are signed by the senders' own code, not ours: the Standard
Webhooks reference implementation (npm `standardwebhooks`, Webhook.sign)
and GitHub's signer (npm `@octokit/webhooks-methods`, sign), run under
Node by tests/node/sign.mjs from the packages `npm ci` installed into the
build tree (the ctest fixture setup.webhook_signers; when this file runs
alone and they are missing, the same tests/node/install.cmake is run
here). Python's hmac signs the generic hmac-sha256 scheme (hex and
base64, with and without a prefix) and the Standard Webhooks cases no
library would produce (a timestamp that is not an integer).

The contract the cases check:

- `webhook`: signature "standard" (default) | "hmac-sha256" | "none";
  header (required for hmac-sha256), prefix (default ""), encoding "hex"
  (default) | "base64", secrets (required, non-empty unless "none";
  "env:NAME" read at load, unset is a configuration error; a standard
  secret is whsec_<base64>, the prefix optional, bad base64 an error),
  key "header:NAME" | "json:/pointer" (default header:webhook-id for
  standard, required otherwise), tolerance_seconds (default 300,
  1..86400). A configuration error exits 2 with one line naming the key.
- Every request on a webhook route is verified, whatever its method. A
  missing or wrong signature, a webhook-timestamp that is not an integer or
  more than the tolerance away from now: 401 invalid_signature, nothing
  forwarded, access outcome `rejected`,
  idemgate_webhook_verifications_total{result="invalid"} (valid ones
  {result="valid"}).
- Then the key: header absent is 400 idempotency_key_required; a JSON
  pointer into a body that is not JSON, a member that is absent, a value
  neither a string nor an integer is 400 invalid_idempotency_key; an
  integer is its decimal text; validated like any Idempotency-Key. The
  client's Idempotency-Key is ignored; the scope is the route
  (scope_headers do not matter).
- Then the engine: first delivery executes; a redelivery while it runs is
  409 request_in_progress; after the answer, the replay byte for byte with
  Idempotent-Replayed: true; a 5xx releases the key; another body under the
  same key is 409 idempotency_key_reuse.

Everything runs on the memory store; the storm of redeliveries also on
Redis. Executions are counted at the test upstream (upstream.py counts
every request by path; a route's path is forwarded as sent).
"""

import base64
import filecmp
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from idemtest.assertions import (assert_error, assert_in_progress, assert_one_fresh,
                                 assert_replay_of, wait_until)
from idemtest.config import merge
from idemtest.http import metrics, read_request, request
from idemtest.procs import (TESTS, RawServer, free_port, idemgate_bin,
                            run_idemgate)
from idemtest.proto import Proto
from idemtest.storm import Bg, storm_each

NODE_SRC = os.path.join(TESTS, "node")

# Standard Webhooks secrets (whsec_ + base64 of the key bytes).
KEY1 = b"idemgate webhook test key one 32"
KEY2 = b"idemgate webhook test key two 32"
KEY3 = b"a key that is in no route's list"
SECRET1 = "whsec_" + base64.b64encode(KEY1).decode()
SECRET2 = "whsec_" + base64.b64encode(KEY2).decode()
OTHER = "whsec_" + base64.b64encode(KEY3).decode()
# hmac-sha256 secrets are used as they are written.
HSECRET1 = "It's a Secret to Everybody"
HSECRET2 = "rotated-secret-2"
HOTHER = "not-the-secret"

VALID = 'idemgate_webhook_verifications_total{result="valid"}'
INVALID = 'idemgate_webhook_verifications_total{result="invalid"}'
REPLAYED = 'idemgate_requests_total{outcome="replayed"}'

JSON_CT = ("Content-Type", "application/json")


# -- the signers ------------------------------------------------------------


def node_dir():
    """Where npm ci installed tests/node: IDEMGATE_NODE_DIR (set by ctest),
    else node/ beside the idemgate binary (the build tree)."""
    d = os.environ.get("IDEMGATE_NODE_DIR")
    if d:
        return d
    return os.path.join(os.path.dirname(os.path.abspath(idemgate_bin())), "node")


class Signer:
    """tests/node/sign.mjs in the directory dir (where its packages are
    installed); one node process per call, a batch of requests at once."""

    def __init__(self, d):
        self.dir = d
        self.node = shutil.which("node") or shutil.which("nodejs") or "node"

    def run(self, reqs):
        r = subprocess.run([self.node, os.path.join(self.dir, "sign.mjs")],
                           input=json.dumps(reqs), cwd=self.dir,
                           capture_output=True, text=True, timeout=60,
                           check=False)
        assert r.returncode == 0, "sign.mjs failed: %s" % r.stderr
        return json.loads(r.stdout)

    def standard_many(self, items):
        """items: (secret, msg_id, timestamp, body bytes); returns one list
        of header pairs per item, as standardwebhooks' Webhook.sign made
        them."""
        out = self.run([{"scheme": "standard", "secret": s, "id": i,
                         "timestamp": int(t), "body": b.decode("utf-8")}
                        for s, i, t, b in items])
        return [list(h.items()) for h in out]

    def standard(self, secret, msg_id, body, ts=None):
        return self.standard_many([(secret, msg_id, now() if ts is None else ts,
                                    body)])[0]

    def github(self, secret, body):
        """The X-Hub-Signature-256 value @octokit/webhooks-methods' sign made."""
        out = self.run({"scheme": "github", "secret": secret,
                        "body": body.decode("utf-8")})
        return out["x-hub-signature-256"]


@pytest.fixture(scope="module")
def signers():
    d = node_dir()
    mods = os.path.join(d, "node_modules")
    if not (os.path.isdir(os.path.join(mods, "standardwebhooks"))
            and os.path.isdir(os.path.join(mods, "@octokit", "webhooks-methods"))):
        r = subprocess.run([shutil.which("cmake") or "cmake", "-DSRC=" + NODE_SRC,
                            "-DDST=" + d, "-P", os.path.join(NODE_SRC, "install.cmake")],
                           capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, "installing the signers failed:\n%s%s" % (r.stdout, r.stderr)
    # the signer itself may have changed since npm ci copied it
    src, dst = os.path.join(NODE_SRC, "sign.mjs"), os.path.join(d, "sign.mjs")
    if not os.path.exists(dst) or not filecmp.cmp(src, dst, shallow=False):
        shutil.copyfile(src, dst)
    return Signer(d)


def now():
    return int(time.time())


def std_sig(secret, msg_id, ts, body):
    """A Standard Webhooks v1 signature computed here (for what no library
    would sign, e.g. a timestamp that is not an integer)."""
    raw = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    mac = hmac.new(base64.b64decode(raw), b"%s.%s.%s" % (
        msg_id.encode(), str(ts).encode(), body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def hmac_hex(secret, body):
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def hmac_b64(secret, body):
    return base64.b64encode(hmac.new(secret.encode(), body,
                                     hashlib.sha256).digest()).decode()


def without(headers, name):
    return [(k, v) for k, v in headers if k.lower() != name.lower()]


def replace(headers, name, value):
    return without(headers, name) + [(name, value)]


# -- the gateway --------------------------------------------------------------


def route(prefix, upstream_url, webhook, **more):
    r = {"prefix": prefix, "upstream": upstream_url, "webhook": webhook}
    r.update(more)
    return r


@pytest.fixture
def gate(idemgate, upstream):
    """gate(routes, store=None, admin=False, env=None, **top) starts idemgate
    with those routes (in front of the test upstream unless a route says
    otherwise) on the memory store (or the store settings given); with
    admin, g.admin is the admin port."""
    def start(routes, store=None, admin=False, env=None, **top):
        cfg = merge({"upstream": upstream.url}, store or {"store": "memory"})
        cfg["routes"] = routes
        cfg = merge(cfg, top)
        admin_port = None
        if admin:
            admin_port = free_port()
            cfg["admin"] = {"listen": "127.0.0.1:%d" % admin_port}
        g = idemgate(cfg, env=env)
        g.admin = admin_port
        return g
    return start


def std_gate(gate, upstream, webhook=None, prefix="/hooks/std", **kw):
    return gate([route(prefix, upstream.url, merge({"secrets": [SECRET1]}, webhook))], **kw)


def deliver(g, path, headers, body, method="POST"):
    return request(g.port, method, path, [JSON_CT] + list(headers), body)


def execs(upstream, path):
    """How many requests for path (without its query) the upstream saw."""
    return upstream.stats()["by_path"].get(path.split("?")[0], 0)


def total(upstream):
    return upstream.stats()["total"]


def rejected(r, g=None):
    """401 invalid_signature (and, given g, its access line says
    `rejected`)."""
    assert_error(r, 401, "invalid_signature")
    if g is not None:
        assert wait_until(lambda: any(ln.get("status") == 401 for ln in g.access_lines()),
                          5), g.stderr()
        lines = [ln for ln in g.access_lines() if ln.get("status") == 401]
        assert all(ln.get("outcome") == "rejected" for ln in lines), lines


def echoed_body(r):
    """The body the upstream (upstream.py's echo) received."""
    assert r.status == 200, r
    return r.json()["body"].encode("latin-1")


def body_of(event_id, **more):
    doc = {"type": "invoice.paid", "id": event_id}
    doc.update(more)
    return json.dumps(doc, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------
# the signers themselves (the published test vectors: a check of the setup)
# ---------------------------------------------------------------------------


def test_signers_reproduce_the_published_examples(signers):
    # Standard Webhooks' own example, and GitHub's documented example
    h = dict(signers.standard_many([("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                                     "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                                     b'{"test": 2432232314}')])[0])
    assert h["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", h
    assert h["webhook-timestamp"] == "1614265330", h
    assert (signers.github("It's a Secret to Everybody", b"Hello, World!")
            == "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
    # the local signer used for the odd cases agrees with the library
    ts = now()
    h = dict(signers.standard(SECRET1, "msg_x", b"{}", ts))
    assert h["webhook-signature"] == std_sig(SECRET1, "msg_x", ts, b"{}")


# ---------------------------------------------------------------------------
# Standard Webhooks
# ---------------------------------------------------------------------------


def test_standard_good_signature_forwarded_once(gate, upstream, signers):
    g = std_gate(gate, upstream)
    body = body_of("evt_1")
    r = deliver(g, "/hooks/std/a", signers.standard(SECRET1, "msg_1", body), body)
    assert r.status == 200, r
    assert r.header("Idempotent-Replayed") is None, r
    assert echoed_body(r) == body  # the raw body, as signed
    assert execs(upstream, "/hooks/std/a") == 1
    assert total(upstream) == 1


def test_standard_wrong_secret_is_401_and_nothing_forwarded(gate, upstream, signers):
    g = std_gate(gate, upstream)
    body = body_of("evt_1")
    r = deliver(g, "/hooks/std/a", signers.standard(OTHER, "msg_1", body), body)
    rejected(r, g)
    assert total(upstream) == 0
    # the same event, signed right, still executes: a forged delivery took
    # no lock
    r = deliver(g, "/hooks/std/a", signers.standard(SECRET1, "msg_1", body), body)
    assert r.status == 200 and not r.replayed, r
    assert total(upstream) == 1


def test_standard_rotated_secrets_both_accepted(gate, upstream, signers):
    g = gate([route("/hooks/std", upstream.url, {"secrets": [SECRET1, SECRET2]})])
    b1, b2, b3 = body_of("evt_old"), body_of("evt_new"), body_of("evt_other")
    ts = now()
    h1, h2, h3 = signers.standard_many([(SECRET1, "msg_old", ts, b1),
                                        (SECRET2, "msg_new", ts, b2),
                                        (OTHER, "msg_other", ts, b3)])
    r = deliver(g, "/hooks/std/a", h1, b1)
    assert r.status == 200 and not r.replayed, r
    r = deliver(g, "/hooks/std/a", h2, b2)
    assert r.status == 200 and not r.replayed, r
    rejected(deliver(g, "/hooks/std/a", h3, b3))
    assert execs(upstream, "/hooks/std/a") == 2


def test_standard_secret_without_whsec_prefix(gate, upstream, signers):
    g = gate([route("/hooks/std", upstream.url,
                    {"signature": "standard", "secrets": [SECRET1[len("whsec_"):]]})])
    body = body_of("evt_1")
    r = deliver(g, "/hooks/std/a", signers.standard(SECRET1, "msg_1", body), body)
    assert r.status == 200, r
    rejected(deliver(g, "/hooks/std/a", signers.standard(OTHER, "msg_2", body), body))
    assert total(upstream) == 1


def test_standard_secret_from_the_environment(gate, upstream, signers):
    g = gate([route("/hooks/std", upstream.url,
                    {"secrets": ["env:IDEMGATE_TEST_HOOK_SECRET"]})],
             env={"IDEMGATE_TEST_HOOK_SECRET": SECRET2})
    body = body_of("evt_1")
    ts = now()
    good, bad = signers.standard_many([(SECRET2, "msg_1", ts, body),
                                       (SECRET1, "msg_2", ts, body)])
    assert deliver(g, "/hooks/std/a", good, body).status == 200
    rejected(deliver(g, "/hooks/std/a", bad, body))
    # the literal text "env:..." is not a secret
    assert total(upstream) == 1


def test_standard_tampered_delivery_is_401(gate, upstream, signers):
    g = std_gate(gate, upstream)
    body = body_of("evt_1", amount=100)
    h = signers.standard(SECRET1, "msg_1", body)
    # the body changed by one byte, the id, the timestamp (a second later)
    rejected(deliver(g, "/hooks/std/a", h, body_of("evt_1", amount=900)), g)
    rejected(deliver(g, "/hooks/std/a", h, body + b" "))
    rejected(deliver(g, "/hooks/std/a", replace(h, "webhook-id", "msg_2"), body))
    ts = int(dict(h)["webhook-timestamp"])
    rejected(deliver(g, "/hooks/std/a", replace(h, "webhook-timestamp", str(ts + 1)), body))
    # a signature cut short, or not base64
    sig = dict(h)["webhook-signature"]
    rejected(deliver(g, "/hooks/std/a", replace(h, "webhook-signature", sig[:-4]), body))
    rejected(deliver(g, "/hooks/std/a", replace(h, "webhook-signature", "v1,***"), body))
    assert total(upstream) == 0
    assert deliver(g, "/hooks/std/a", h, body).status == 200
    assert total(upstream) == 1


def test_standard_timestamp_tolerance(gate, upstream, signers):
    g = gate([route("/hooks/short", upstream.url,
                    {"secrets": [SECRET1], "tolerance_seconds": 60}),
              route("/hooks/default", upstream.url, {"secrets": [SECRET1]})])
    t = now()
    cases = [  # (path, id, timestamp, accepted)
        ("/hooks/short/a", "m1", t - 600, False),
        ("/hooks/short/a", "m2", t + 600, False),
        ("/hooks/short/a", "m3", t - 120, False),
        ("/hooks/short/a", "m4", t + 120, False),
        ("/hooks/short/a", "m5", t - 20, True),
        ("/hooks/short/a", "m6", t + 20, True),
        ("/hooks/default/a", "m7", t - 400, False),
        ("/hooks/default/a", "m8", t + 400, False),
        ("/hooks/default/a", "m9", t - 200, True),
        ("/hooks/default/a", "m10", t + 200, True),
    ]
    signed = signers.standard_many([(SECRET1, i, ts, body_of(i)) for _, i, ts, _ in cases])
    for (path, i, ts, ok), h in zip(cases, signed):
        r = deliver(g, path, h, body_of(i))
        if ok:
            assert r.status == 200 and not r.replayed, (i, ts - t, r)
        else:
            rejected(r)
    assert execs(upstream, "/hooks/short/a") == 2
    assert execs(upstream, "/hooks/default/a") == 2


def test_standard_timestamp_tolerance_bounds(gate, upstream, signers):
    # only "more than tolerance_seconds away" is refused. Exact without a
    # race: a timestamp signed tolerance seconds ahead can only come closer
    # while the delivery travels, one signed tolerance + 1 seconds behind
    # only farther.
    g = gate([route("/hooks/short", upstream.url,
                    {"secrets": [SECRET1], "tolerance_seconds": 60})])
    t = now()
    ahead, behind = signers.standard_many([(SECRET1, "m1", t + 60, body_of("m1")),
                                           (SECRET1, "m2", t - 61, body_of("m2"))])
    r = deliver(g, "/hooks/short/a", ahead, body_of("m1"))
    assert r.status == 200 and not r.replayed, r
    rejected(deliver(g, "/hooks/short/a", behind, body_of("m2")))
    assert execs(upstream, "/hooks/short/a") == 1


@pytest.mark.parametrize("ts", ["not-a-number", "", "1.7e9", "%d.5", "%dx",
                                "0x10"])
def test_standard_timestamp_not_an_integer_is_401(gate, upstream, ts):
    g = std_gate(gate, upstream)
    text = ts % now() if "%d" in ts else ts
    body = body_of("evt_1")
    h = [("webhook-id", "msg_1"), ("webhook-timestamp", text),
         ("webhook-signature", std_sig(SECRET1, "msg_1", text, body))]
    rejected(deliver(g, "/hooks/std/a", h, body))
    assert total(upstream) == 0


def test_standard_several_signatures_in_one_header(gate, upstream, signers):
    g = std_gate(gate, upstream)
    ts = now()
    items = [(SECRET1, "msg_%d" % i, ts, body_of("e%d" % i)) for i in range(6)]
    good = [dict(h)["webhook-signature"] for h in signers.standard_many(items)]
    forged = [dict(h)["webhook-signature"] for h in signers.standard_many(
        [(OTHER, i, t, b) for _, i, t, b in items])]

    def send(i, sig):
        _, msg_id, t, body = items[i]
        return deliver(g, "/hooks/std/a", [("webhook-id", msg_id),
                                           ("webhook-timestamp", str(t)),
                                           ("webhook-signature", sig)], body)

    # one valid among invalid ones, wherever it stands
    assert send(0, "%s %s" % (forged[0], good[0])).status == 200
    assert send(1, "%s %s %s" % (good[1], forged[1], "v1,AAAA")).status == 200
    # the sender signing with two secrets (its own rotation)
    assert send(2, "%s v1,%s" % (forged[2], good[2][3:])).status == 200
    # entries of another version are ignored, even with a valid value
    assert send(3, "v2,%s v1a,%s %s" % (good[3][3:], good[3][3:], forged[3])).status == 401
    assert send(3, "v1a,%s" % good[3][3:]).status == 401
    # only invalid ones
    rejected(send(4, "%s v1,AAAA" % forged[4]))
    assert send(5, "v1,%s %s" % (good[5][3:], good[5])).status == 200
    assert execs(upstream, "/hooks/std/a") == 4


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_standard_missing_header_is_401(gate, upstream, signers, missing):
    g = std_gate(gate, upstream)
    body = body_of("evt_1")
    h = signers.standard(SECRET1, "msg_1", body)
    rejected(deliver(g, "/hooks/std/a", without(h, missing), body), g)
    rejected(deliver(g, "/hooks/std/a", replace(h, missing, ""), body))
    assert total(upstream) == 0


def test_standard_webhook_id_validated_as_a_key(gate, upstream, signers):
    # signed right, but the id is no valid key: a space, over key_max_length
    g = std_gate(gate, upstream)
    ts = now()
    ids = ["msg 1", "m" * 256, "m" * 255]
    heads = signers.standard_many([(SECRET1, i, ts, b"{}") for i in ids])
    assert_error(deliver(g, "/hooks/std/a", heads[0], b"{}"), 400, "invalid_idempotency_key")
    assert_error(deliver(g, "/hooks/std/a", heads[1], b"{}"), 400, "invalid_idempotency_key")
    assert total(upstream) == 0
    assert deliver(g, "/hooks/std/a", heads[2], b"{}").status == 200


def test_every_method_is_verified(gate, upstream, signers):
    g = std_gate(gate, upstream)
    for method in ("GET", "PUT", "DELETE", "PATCH", "POST", "HEAD", "OPTIONS"):
        r = request(g.port, method, "/hooks/std/m", [JSON_CT])
        assert r.status == 401, (method, r)
        if method != "HEAD":
            assert_error(r, 401, "invalid_signature")
    assert total(upstream) == 0
    # a signed GET is forwarded, and being no covered method, every time
    ts = now()
    h1, h2 = signers.standard_many([(SECRET1, "msg_g", ts, b""), (SECRET1, "msg_g", ts + 1, b"")])
    r1 = request(g.port, "GET", "/hooks/std/m", h1)
    r2 = request(g.port, "GET", "/hooks/std/m", h2)
    assert r1.status == 200 and r2.status == 200, (r1, r2)
    assert not r2.replayed, r2
    assert execs(upstream, "/hooks/std/m") == 2


# ---------------------------------------------------------------------------
# hmac-sha256
# ---------------------------------------------------------------------------


GITHUB = {"signature": "hmac-sha256", "header": "X-Hub-Signature-256",
          "prefix": "sha256=", "secrets": [HSECRET1], "key": "header:X-GitHub-Delivery"}


def test_github_signature_by_octokit(gate, upstream, signers):
    g = gate([route("/hooks/github", upstream.url, GITHUB)])
    body = b'{"action":"opened","number":1}'
    sig = signers.github(HSECRET1, body)
    h = [("X-GitHub-Event", "pull_request"), ("X-GitHub-Delivery", "d-1"),
         ("X-Hub-Signature-256", sig)]
    first = deliver(g, "/hooks/github", h, body)
    assert first.status == 200 and not first.replayed, first
    assert echoed_body(first) == body
    again = deliver(g, "/hooks/github", h, body)
    assert_replay_of(again, first)
    assert execs(upstream, "/hooks/github") == 1
    # wrong secret, the header gone, the prefix left off, another prefix,
    # another body
    rejected(deliver(g, "/hooks/github", replace(h, "X-Hub-Signature-256",
                                                 signers.github(HOTHER, body)), body), g)
    rejected(deliver(g, "/hooks/github", without(h, "X-Hub-Signature-256"), body))
    rejected(deliver(g, "/hooks/github", replace(h, "X-Hub-Signature-256",
                                                 sig[len("sha256="):]), body))
    rejected(deliver(g, "/hooks/github", replace(h, "X-Hub-Signature-256",
                                                 "sha1=" + sig[len("sha256="):]), body))
    rejected(deliver(g, "/hooks/github", replace(h, "X-Hub-Signature-256", ""), body))
    rejected(deliver(g, "/hooks/github", h, body + b"\n"))
    assert execs(upstream, "/hooks/github") == 1
    # signed, but the key's header is missing: 400, nothing forwarded
    r = deliver(g, "/hooks/github", without(h, "X-GitHub-Delivery"), body)
    assert_error(r, 400, "idempotency_key_required")
    assert execs(upstream, "/hooks/github") == 1


def test_hmac_hex_either_case_without_prefix(gate, upstream):
    g = gate([route("/hooks/clipia", upstream.url,
                    {"signature": "hmac-sha256", "header": "X-Clipia-Signature",
                     "secrets": [HSECRET1], "key": "json:/request_id"})])
    b1 = b'{"request_id":"req_1","event":"video.ready"}'
    b2 = b'{"request_id":"req_2","event":"video.ready"}'
    r = deliver(g, "/hooks/clipia", [("X-Clipia-Signature", hmac_hex(HSECRET1, b1))], b1)
    assert r.status == 200 and not r.replayed, r
    r = deliver(g, "/hooks/clipia", [("X-Clipia-Signature", hmac_hex(HSECRET1, b2).upper())], b2)
    assert r.status == 200 and not r.replayed, r
    for bad in (hmac_hex(HOTHER, b1), hmac_hex(HSECRET1, b1)[:-2], hmac_b64(HSECRET1, b1),
                "sha256=" + hmac_hex(HSECRET1, b1), " " + hmac_hex(HSECRET1, b1) + "00"):
        rejected(deliver(g, "/hooks/clipia", [("X-Clipia-Signature", bad)], b1))
    assert execs(upstream, "/hooks/clipia") == 2


def test_hmac_base64_with_and_without_prefix(gate, upstream):
    g = gate([route("/hooks/b64", upstream.url,
                    {"signature": "hmac-sha256", "header": "X-Signature", "encoding": "base64",
                     "secrets": [HSECRET1], "key": "header:X-Event-Id"}),
              route("/hooks/b64p", upstream.url,
                    {"signature": "hmac-sha256", "header": "X-Signature", "encoding": "base64",
                     "prefix": "v0=", "secrets": [HSECRET1], "key": "header:X-Event-Id"})])
    body = b'{"ok":true}'
    sig = hmac_b64(HSECRET1, body)
    ev = ("X-Event-Id", "ev-1")
    assert deliver(g, "/hooks/b64", [ev, ("X-Signature", sig)], body).status == 200
    assert deliver(g, "/hooks/b64p", [ev, ("X-Signature", "v0=" + sig)], body).status == 200
    rejected(deliver(g, "/hooks/b64", [ev, ("X-Signature", hmac_hex(HSECRET1, body))], body))
    rejected(deliver(g, "/hooks/b64", [ev, ("X-Signature", hmac_b64(HOTHER, body))], body))
    rejected(deliver(g, "/hooks/b64p", [ev, ("X-Signature", sig)], body))
    rejected(deliver(g, "/hooks/b64p", [ev, ("X-Signature", "V0=" + sig)], body))
    assert execs(upstream, "/hooks/b64") == 1
    assert execs(upstream, "/hooks/b64p") == 1


def test_hmac_rotated_and_environment_secrets(gate, upstream):
    g = gate([route("/hooks/rot", upstream.url,
                    {"signature": "hmac-sha256", "header": "X-Sig",
                     "secrets": ["env:IDEMGATE_TEST_HMAC_SECRET", HSECRET1],
                     "key": "header:X-Event-Id"})],
             env={"IDEMGATE_TEST_HMAC_SECRET": HSECRET2})
    body = b'{"n":1}'
    for i, secret in enumerate((HSECRET1, HSECRET2)):
        r = deliver(g, "/hooks/rot", [("X-Event-Id", "e%d" % i),
                                      ("X-Sig", hmac_hex(secret, body))], body)
        assert r.status == 200 and not r.replayed, (secret, r)
    for bad in (HOTHER, "env:IDEMGATE_TEST_HMAC_SECRET"):
        rejected(deliver(g, "/hooks/rot", [("X-Event-Id", "e9"), ("X-Sig", hmac_hex(bad, body))],
                         body))
    assert execs(upstream, "/hooks/rot") == 2


def test_signature_none_takes_the_key_only(gate, upstream):
    g = gate([route("/hooks/none", upstream.url, {"signature": "none", "key": "json:/id"})])
    body = b'{"id":"n-1"}'
    first = deliver(g, "/hooks/none", [], body)
    assert first.status == 200 and not first.replayed, first
    assert_replay_of(deliver(g, "/hooks/none", [], body), first)
    assert execs(upstream, "/hooks/none") == 1


# ---------------------------------------------------------------------------
# the key
# ---------------------------------------------------------------------------


def clipia(gate, upstream, key, **webhook):
    return gate([route("/hooks/c", upstream.url,
                       merge({"signature": "hmac-sha256", "header": "X-Sig",
                              "secrets": [HSECRET1], "key": key}, webhook))])


def signed(body, secret=HSECRET1):
    return [("X-Sig", hmac_hex(secret, body))]


def test_json_pointer_key_is_used(gate, upstream):
    g = clipia(gate, upstream, "json:/request_id")
    b1 = b'{"request_id":"req_1","amount":1}'
    first = deliver(g, "/hooks/c", signed(b1), b1)
    assert first.status == 200 and not first.replayed, first
    # the same body again: the replay, whatever Idempotency-Key the client
    # sends (ignored on a webhook route) and whatever credential
    again = deliver(g, "/hooks/c", signed(b1) + [("Idempotency-Key", "other-key"),
                                                 ("Authorization", "Bearer someone")], b1)
    assert_replay_of(again, first)
    # the same request_id with another (validly signed) body: key reuse
    b2 = b'{"request_id":"req_1","amount":2}'
    assert_error(deliver(g, "/hooks/c", signed(b2), b2), 409, "idempotency_key_reuse")
    # another request_id executes, even under the first one's Idempotency-Key
    b3 = b'{"request_id":"req_3","amount":1}'
    r = deliver(g, "/hooks/c", signed(b3) + [("Idempotency-Key", "req_1")], b3)
    assert r.status == 200 and not r.replayed, r
    assert execs(upstream, "/hooks/c") == 2


@pytest.mark.parametrize("body", [
    b'{"amount":1}',                      # member absent
    b'{"request":{"request_id":"x"}}',    # only deeper down
    b'not json at all',                   # not JSON
    b'{"request_id":"req_1"',             # cut JSON
    b'',                                  # empty body
    b'["req_1"]',                         # an array
    b'{"request_id":1.5}',                # neither string nor integer
    b'{"request_id":true}',
    b'{"request_id":null}',
    b'{"request_id":{"id":"x"}}',
    b'{"request_id":["x"]}',
    b'{"request_id":""}',                 # then invalid as a key: empty,
    b'{"request_id":"two words"}',        # a space,
    b'{"request_id":"caf\\u00e9"}',       # not ASCII,
    b'{"request_id":"' + b"k" * 256 + b'"}',  # over key_max_length
], ids=["absent", "deeper", "not-json", "cut-json", "empty", "array", "float", "bool", "null",
        "object", "list", "empty-string", "space", "non-ascii", "too-long"])
def test_json_pointer_bad_value_is_400(gate, upstream, body):
    g = clipia(gate, upstream, "json:/request_id")
    assert_error(deliver(g, "/hooks/c", signed(body), body), 400, "invalid_idempotency_key")
    assert total(upstream) == 0


def test_bad_signature_is_401_before_the_key(gate, upstream):
    g = clipia(gate, upstream, "json:/request_id")
    body = b'not json'
    rejected(deliver(g, "/hooks/c", signed(body, HOTHER), body))
    unsigned = b'{"amount":1}'
    rejected(deliver(g, "/hooks/c", [], unsigned))
    assert total(upstream) == 0


def test_json_pointer_integer_and_escapes(gate, upstream):
    # RFC 6901: ~1 is "/", ~0 is "~"
    g = clipia(gate, upstream, "json:/data~1event/a~0b")
    b1 = b'{"data/event":{"a~b":42},"n":1}'
    first = deliver(g, "/hooks/c", signed(b1), b1)
    assert first.status == 200 and not first.replayed, first
    assert_replay_of(deliver(g, "/hooks/c", signed(b1), b1), first)
    # the integer 42 is the key "42": the string "42" with another body is
    # the same key, so a reuse
    b2 = b'{"data/event":{"a~b":"42"},"n":2}'
    assert_error(deliver(g, "/hooks/c", signed(b2), b2), 409, "idempotency_key_reuse")
    # the unescaped spellings are other members
    b3 = b'{"data":{"event":{"a~b":"x"}}}'
    assert_error(deliver(g, "/hooks/c", signed(b3), b3), 400, "invalid_idempotency_key")
    b4 = b'{"data/event":{"a~b":7}}'
    assert deliver(g, "/hooks/c", signed(b4), b4).status == 200
    assert execs(upstream, "/hooks/c") == 2


def test_header_key_validated_like_an_idempotency_key(gate, upstream):
    g = clipia(gate, upstream, "header:X-Event-Id")
    body = b'{"a":1}'
    for bad in ("", "x" * 256):
        r = deliver(g, "/hooks/c", signed(body) + [("X-Event-Id", bad)], body)
        assert_error(r, 400, "invalid_idempotency_key")
    r = deliver(g, "/hooks/c", signed(body) + [("X-Event-Id", "ev-1"), ("X-Event-Id", "ev-2")],
                body)
    assert_error(r, 400, "invalid_idempotency_key")
    assert total(upstream) == 0
    r = deliver(g, "/hooks/c", signed(body) + [("X-Event-Id", "x" * 255)], body)
    assert r.status == 200, r


# ---------------------------------------------------------------------------
# the engine behind the verification
# ---------------------------------------------------------------------------


def test_redelivery_after_the_answer_is_replayed(gate, upstream, signers):
    g = std_gate(gate, upstream)
    body = body_of("evt_1")
    ts = now()
    h1, h2 = signers.standard_many([(SECRET1, "msg_1", ts, body), (SECRET1, "msg_1", ts + 7, body)])
    first = deliver(g, "/hooks/std/a", h1 + [("Authorization", "Bearer a")], body)
    assert first.status == 200 and not first.replayed, first
    # the sender's redelivery: signed anew (another timestamp), another
    # credential (scope_headers do not matter on a webhook route)
    again = deliver(g, "/hooks/std/a", h2 + [("Authorization", "Bearer b")], body)
    assert_replay_of(again, first)
    assert again.body == first.body
    # the very same delivery again (a sender retrying verbatim)
    assert_replay_of(deliver(g, "/hooks/std/a", h1, body), first)
    assert execs(upstream, "/hooks/std/a") == 1


def test_deliveries_over_http2_and_chunked(gate, upstream, signers):
    # the signature is over the body as sent, whatever its framing: a
    # delivery over HTTP/2 (h2c), its redeliveries chunked and over HTTP/1.1
    g = std_gate(gate, upstream)
    body = body_of("evt_h2", note="x" * 300)
    ts = now()
    h1, h2, h3 = signers.standard_many([(SECRET1, "msg_h2", ts + i, body) for i in range(3)])
    first = Proto("h2").request(g.port, "POST", "/hooks/std/a",
                                [("content-type", "application/json")] + h1, body)
    assert first.status == 200 and not first.replayed, first
    assert echoed_body(first) == body
    half = len(body) // 2
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        half, body[:half], len(body) - half, body[half:])
    again = request(g.port, "POST", "/hooks/std/a",
                    [JSON_CT, ("Transfer-Encoding", "chunked")] + h2, chunked)
    assert again.status == 200 and again.replayed, again
    assert again.body == first.body
    rejected(Proto("h2").request(g.port, "POST", "/hooks/std/a",
                                 [("content-type", "application/json")] + h3, body + b" "))
    assert execs(upstream, "/hooks/std/a") == 1


def test_redelivery_with_another_body_is_key_reuse(gate, upstream, signers):
    g = std_gate(gate, upstream)
    b1, b2 = body_of("evt_1", amount=1), body_of("evt_1", amount=2)
    ts = now()
    h1, h2 = signers.standard_many([(SECRET1, "msg_1", ts, b1), (SECRET1, "msg_1", ts, b2)])
    assert deliver(g, "/hooks/std/a", h1, b1).status == 200
    assert_error(deliver(g, "/hooks/std/a", h2, b2), 409, "idempotency_key_reuse")
    assert execs(upstream, "/hooks/std/a") == 1


def test_redelivery_while_the_first_runs_is_409(gate, upstream, signers):
    g = std_gate(gate, upstream, prefix="/slow")
    body = body_of("evt_slow")
    ts = now()
    h1, h2, h3 = signers.standard_many([(SECRET1, "msg_s", ts + i, body) for i in range(3)])
    first = Bg(deliver, g, "/slow?ms=1500", h1, body)
    assert wait_until(lambda: upstream.in_flight() >= 1, 10), upstream.stats()
    assert_in_progress(deliver(g, "/slow?ms=1500", h2, body))
    r1 = first.result(20)
    assert r1.status == 200 and not r1.replayed, r1
    assert_replay_of(deliver(g, "/slow?ms=1500", h3, body), r1)
    assert execs(upstream, "/slow") == 1


@pytest.mark.parametrize("store_cfg", ["memory", "redis"], indirect=True)
def test_storm_of_redeliveries_executes_once(gate, upstream, signers, store_cfg):
    g = std_gate(gate, upstream, prefix="/slow", store=store_cfg)
    body = body_of("evt_storm")
    ts = now()
    n = 20
    # every redelivery signed anew by the sender (its own timestamp)
    heads = signers.standard_many([(SECRET1, "msg_storm", ts - i, body) for i in range(n + 1)])
    path = "/slow?ms=400"
    results = storm_each([g.port], n, lambda i: (path, [JSON_CT] + heads[i], body))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    first = assert_one_fresh(results, 200, assert_replay_of)
    assert execs(upstream, "/slow") == 1
    later = deliver(g, path, heads[n], body)
    assert_replay_of(later, first)
    assert execs(upstream, "/slow") == 1


class Consumer:
    """A webhook consumer on a RawServer: every request is an execution
    (counted); the n-th answers statuses[n-1] (the last one from then on)."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.bodies = []
        self.lock = threading.Lock()
        self.server = RawServer(self.serve)
        self.url = self.server.url

    def serve(self, sock):
        buf = b""
        try:
            while True:
                sock.settimeout(30)
                req, buf = read_request(sock, buf)
                if req is None:
                    return
                with self.lock:
                    n = len(self.bodies) + 1
                    self.bodies.append(req)
                    status = self.statuses[min(n, len(self.statuses)) - 1]
                body = json.dumps({"execution": n}).encode()
                sock.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                             b"X-Execution: %d\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, n, len(body), body))
        except OSError:
            return

    def count(self):
        with self.lock:
            return len(self.bodies)

    def close(self):
        self.server.close()


def test_consumer_500_then_200(gate, signers):
    consumer = Consumer([500, 200])
    try:
        g = gate([route("/hooks/std", consumer.url, {"secrets": [SECRET1]})])
        body = body_of("evt_retry")
        ts = now()
        heads = signers.standard_many([(SECRET1, "msg_r", ts + i, body) for i in range(3)])
        r1 = deliver(g, "/hooks/std/a", heads[0], body)
        assert r1.status == 500 and not r1.replayed, r1
        assert r1.json() == {"execution": 1}, r1
        # the 500 released the key: the sender's retry executes again
        r2 = deliver(g, "/hooks/std/a", heads[1], body)
        assert r2.status == 200 and not r2.replayed, r2
        assert r2.json() == {"execution": 2}, r2
        assert_replay_of(deliver(g, "/hooks/std/a", heads[2], body), r2)
        assert consumer.count() == 2
    finally:
        consumer.close()


def test_same_event_id_on_two_routes_is_two_keys(gate, upstream, signers):
    g = gate([route("/hooks/a", upstream.url, {"secrets": [SECRET1]}),
              route("/hooks/b", upstream.url, {"secrets": [SECRET1]})])
    body = body_of("evt_1")
    h = signers.standard(SECRET1, "msg_same", body)
    ra = deliver(g, "/hooks/a", h, body)
    rb = deliver(g, "/hooks/b", h, body)
    assert ra.status == 200 and not ra.replayed, ra
    assert rb.status == 200 and not rb.replayed, rb
    assert_replay_of(deliver(g, "/hooks/a", h, body), ra)
    assert_replay_of(deliver(g, "/hooks/b", h, body), rb)
    assert execs(upstream, "/hooks/a") == 1
    assert execs(upstream, "/hooks/b") == 1


def test_metrics_count_verifications_and_replays(gate, upstream, signers):
    g = std_gate(gate, upstream, admin=True)
    m0 = metrics(g.admin)
    body = body_of("evt_m")
    ts = now()
    h1, h2, bad = signers.standard_many([(SECRET1, "msg_m", ts, body),
                                         (SECRET1, "msg_m", ts + 1, body),
                                         (OTHER, "msg_m", ts, body)])
    assert deliver(g, "/hooks/std/a", h1, body).status == 200
    assert deliver(g, "/hooks/std/a", h2, body).replayed
    rejected(deliver(g, "/hooks/std/a", bad, body), g)
    rejected(deliver(g, "/hooks/std/a", [], body))

    def delta(m, name):
        return m.get(name, 0) - m0.get(name, 0)

    want = {VALID: 2, INVALID: 2, REPLAYED: 1}
    assert wait_until(lambda: all(delta(metrics(g.admin), k) == v for k, v in want.items()),
                      5), {k: delta(metrics(g.admin), k) for k in want}
    # the access lines: executed, replayed, rejected twice
    assert wait_until(lambda: len(g.access_lines()) == 4, 5), g.access_lines()
    outcomes = [ln.get("outcome") for ln in g.access_lines()]
    assert outcomes == ["executed", "replayed", "rejected", "rejected"], g.access_lines()


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def check(tmp_path, webhook, env=None):
    cfg = {"listen": "127.0.0.1:%d" % free_port(), "store": "memory",
           "upstream": "http://127.0.0.1:9", "admin": {"listen": "off"},
           "routes": [{"prefix": "/hooks", "upstream": "http://127.0.0.1:9",
                       "webhook": webhook}]}
    path = tmp_path / "idemgate.json"
    path.write_text(json.dumps(cfg))
    return run_idemgate(["-c", str(path), "-t"], env=env)


@pytest.mark.parametrize(("webhook", "env"), [
    ({"secrets": [SECRET1]}, None),
    ({"signature": "standard", "secrets": [SECRET1[len("whsec_"):], SECRET2],
      "key": "json:/id", "tolerance_seconds": 86400}, None),
    ({"secrets": ["env:IDEMGATE_TEST_HOOK_SECRET"], "tolerance_seconds": 1},
     {"IDEMGATE_TEST_HOOK_SECRET": SECRET1}),
    # the contract's own example, as written there
    ({"signature": "hmac-sha256", "header": "X-Clipia-Signature", "prefix": "",
      "encoding": "hex", "secrets": ["..."], "key": "json:/request_id",
      "tolerance_seconds": 300}, None),
    (GITHUB, None),
    ({"signature": "hmac-sha256", "header": "X-Sig", "encoding": "base64",
      "secrets": ["a"], "key": "json:/a~1b/~0c/0"}, None),
    ({"signature": "none", "key": "header:X-Event-Id"}, None),
], ids=["standard-minimal", "standard-full", "standard-env", "spec-example", "github",
        "base64", "none"])
def test_valid_webhook_configs(tmp_path, webhook, env):
    res = check(tmp_path, webhook, env)
    assert res.returncode == 0, res.stderr
    assert "configuration ok" in res.stdout + res.stderr


@pytest.mark.parametrize(("webhook", "env", "names"), [
    ({}, None, "secrets"),
    ({"secrets": []}, None, "secrets"),
    ({"signature": "standard"}, None, "secrets"),
    ({"signature": "hmac-sha256", "secrets": ["s"], "key": "header:X-Id"}, None, "header"),
    ({"signature": "hmac-sha256", "header": "X-Sig", "secrets": ["s"]}, None, "key"),
    ({"signature": "none"}, None, "key"),
    ({"secrets": [SECRET1], "key": "query:id"}, None, "key"),
    ({"secrets": [SECRET1], "key": "header:"}, None, "key"),
    ({"secrets": [SECRET1], "key": "json:request_id"}, None, "key"),
    ({"secrets": [SECRET1], "key": "webhook-id"}, None, "key"),
    ({"secrets": ["env:IDEMGATE_TEST_UNSET_SECRET"]}, None, "secrets"),
    ({"signature": "hmac-sha256", "header": "X-Sig", "key": "header:X-Id",
      "secrets": ["env:IDEMGATE_TEST_UNSET_SECRET"]}, None, "secrets"),
    ({"secrets": ["whsec_not*base64!"]}, None, "secrets"),
    ({"secrets": ["whsec_"]}, None, "secrets"),
    ({"secrets": [SECRET1, "whsec_%%%"]}, None, "secrets"),
    ({"secrets": [SECRET1], "signature": "md5"}, None, "signature"),
    ({"secrets": [SECRET1], "encoding": "base32"}, None, "encoding"),
    ({"secrets": [SECRET1], "tolerance_seconds": 0}, None, "tolerance_seconds"),
    ({"secrets": [SECRET1], "tolerance_seconds": 86401}, None, "tolerance_seconds"),
    ({"secrets": [SECRET1], "tolerance_seconds": "300"}, None, "tolerance_seconds"),
    ({"secrets": SECRET1}, None, "secrets"),
    ({"secrets": [SECRET1, 7]}, None, "secrets"),
    ({"secrets": [SECRET1], "colour": "blue"}, None, "colour"),
], ids=["no-secrets", "empty-secrets", "standard-no-secrets", "hmac-no-header", "hmac-no-key",
        "none-no-key", "key-kind", "key-empty-header", "key-pointer-no-slash", "key-bare",
        "env-unset", "hmac-env-unset", "whsec-bad-base64", "whsec-empty", "whsec-second-bad",
        "signature-unknown", "encoding-unknown", "tolerance-0", "tolerance-86401",
        "tolerance-string", "secrets-string", "secrets-number", "unknown-member"])
def test_bad_webhook_configs_exit_2(tmp_path, webhook, env, names):
    res = check(tmp_path, webhook, env)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    # the key named as the other configuration errors name theirs
    # (config: routes[0].webhook.secrets: ...)
    assert "webhook." + names in lines[0], lines[0]
