"""Per-scope rate and concurrency limits (the `ratelimit` keys, globally and
per route), end to end.

The contract the cases check:

- `ratelimit`: {"enabled": false, "requests": 120, "window_seconds": 60,
  "concurrent": 10, "count": "all", "headers": "legacy"}; `routes[].ratelimit`
  overrides it key by key; `requests: 0` turns the rate limit off,
  `concurrent: 0` the concurrency limit; reloadable.
- The scope is the idempotency scope (the credential of
  `idempotency.scope_headers`), else the client's address.
- Rate: GCRA, a burst of `requests` at once, then one more every
  window/requests. Over it: `429 rate_limit_exceeded` (type
  `rate_limit_error`), `Retry-After` >= 1 whole seconds; nothing forwarded,
  nothing consumed. count "all": every request of the scope counts;
  "covered": only covered requests with a key. Replays and 409s count.
- Concurrency: at most `concurrent` requests of a scope forwarded at once.
  Over it: `429 concurrency_limit_exceeded`, `Retry-After: 1`, nothing
  forwarded, no key locked. Replays and 409s never take a slot. A slot is a
  lease renewed with the lock; a killed instance's slots come back after
  `lock_seconds`.
- Headers on every answer of a limited scope, fresh on every answer (a
  replay's too), replacing the upstream's of the same names: legacy
  `RateLimit-Limit/-Remaining/-Reset`; draft (RFC 8941 structured fields)
  `RateLimit-Policy: "default";q=<requests>;w=<window>` and
  `RateLimit: "default";r=<remaining>;t=<reset>`; none. No RateLimit
  headers with `requests: 0`.
- `idemgate_ratelimited_total{reason="rate"|"concurrency"}`, outcome
  `rate_limited` (access line, `idemgate_requests_total`).
- The same on the memory store and on Redis; two instances on one Redis
  hold one limit; `redis.failure_mode` closed: 503, open: no limit.

A retry right after an answer is a replay, never 409 request_in_progress
(docs/layout.md: the owner's client is held until the store has the
outcome), so the counting cases send it once: a 409 would count. A slot
may be given back a moment after its client read the answer: a request
that needs a slot right after another's answer is retried while it gets
429 concurrency_limit_exceeded (while_no_slot).

Waits never decide a verdict: where a case counts exactly, the emission
interval (window_seconds / requests) is 5 s or more, so no refill happens
inside it; a refill is shown by sleeping at least the emission interval
(waiting longer can only let more through). The test upstream (upstream.py) reports the most
requests it had in flight at once (`max_in_flight`), the measure of the
concurrency cases.
"""

import json
import math
import re
import signal
import threading
import time
from urllib.parse import quote

import pytest

from idemtest.assertions import (DEFAULT_REPLAY_EXCLUDE, assert_error,
                                 assert_in_progress, assert_replay_of,
                                 retry_while, wait_until)
from idemtest.config import gate_config, merge, store_config
from idemtest.http import BODY, hdrs, metrics, post, request
from idemtest.procs import (free_port, non_loopback_ipv4, run_idemgate,
                            wait_port)
from idemtest.storm import Bg, in_threads, storm_each

STORE_IDS = ["memory", "redis"]
SLOW = "/count?ms=%d"
DEFAULTS = {"enabled": False, "requests": 120, "window_seconds": 60,
            "concurrent": 10, "count": "all", "headers": "legacy"}
LEGACY = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
DRAFT = ("ratelimit-policy", "ratelimit")
# a replay is compared without every RateLimit header: they are per answer
FRESH_EXCLUDE = set(DEFAULT_REPLAY_EXCLUDE) | set(LEGACY) | set(DRAFT)
RATE = 'idemgate_ratelimited_total{reason="rate"}'
CONC = 'idemgate_ratelimited_total{reason="concurrency"}'
OUTCOME = 'idemgate_requests_total{outcome="rate_limited"}'
RELOAD_OK = 'idemgate_reloads_total{result="ok"}'


# -- RFC 8941 structured fields (the draft headers) ----------------------------


class Token(str):
    """An sf-token (a bare item that is not a string)."""


class SFError(ValueError):
    pass


class _SF:
    """RFC 8941 section 4.2 parsing of a List of Items with parameters
    (Inner Lists and Byte Sequences are not needed here and refused)."""

    def __init__(self, text):
        self.s = text
        self.i = 0

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self):
        c = self.peek()
        self.i += 1
        return c

    def skip(self, chars):
        while self.peek() and self.peek() in chars:
            self.i += 1

    def list(self):
        self.skip(" ")
        members = []
        if not self.peek():
            return members
        while True:
            if self.peek() == "(":
                raise SFError("inner list not expected")
            members.append(self.item())
            self.skip(" \t")
            if not self.peek():
                return members
            if self.take() != ",":
                raise SFError("expected ',' at %d in %r" % (self.i - 1, self.s))
            self.skip(" \t")
            if not self.peek():
                raise SFError("trailing comma in %r" % self.s)

    def item(self):
        return self.bare(), self.params()

    def params(self):
        out = {}
        while self.peek() == ";":
            self.take()
            self.skip(" ")
            key = self.key()
            value = True
            if self.peek() == "=":
                self.take()
                value = self.bare()
            out[key] = value
        return out

    def key(self):
        c = self.peek()
        if not (c == "*" or "a" <= c <= "z"):
            raise SFError("bad key at %d in %r" % (self.i, self.s))
        start = self.i
        while self.peek() and re.match(r"[a-z0-9_\-.*]", self.peek()):
            self.i += 1
        return self.s[start:self.i]

    def bare(self):
        c = self.peek()
        if c == "-" or c.isdigit():
            return self.number()
        if c == '"':
            return self.string()
        if c == "*" or c.isalpha():
            return self.token()
        if c == "?":
            self.take()
            b = self.take()
            if b not in ("0", "1"):
                raise SFError("bad boolean in %r" % self.s)
            return b == "1"
        raise SFError("bad bare item at %d in %r" % (self.i, self.s))

    def number(self):
        m = re.compile(r"-?\d+(\.\d+)?").match(self.s, self.i)
        if not m:
            raise SFError("bad number in %r" % self.s)
        text = m.group(0)
        digits = text.lstrip("-")
        if m.group(1):
            whole, frac = digits.split(".")
            if len(whole) > 12 or len(frac) > 3:
                raise SFError("decimal too long in %r" % self.s)
            value = float(text)
        else:
            if len(digits) > 15:
                raise SFError("integer too long in %r" % self.s)
            value = int(text)
        self.i = m.end()
        return value

    def string(self):
        self.take()
        out = []
        while True:
            c = self.take()
            if c == "":
                raise SFError("unterminated string in %r" % self.s)
            if c == "\\":
                e = self.take()
                if e not in ('"', "\\"):
                    raise SFError("bad escape in %r" % self.s)
                out.append(e)
            elif c == '"':
                return "".join(out)
            elif not 0x20 <= ord(c) <= 0x7E:
                raise SFError("bad string character in %r" % self.s)
            else:
                out.append(c)

    def token(self):
        m = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*").match(self.s, self.i)
        self.i = m.end()
        return Token(m.group(0))


def sf_list(text):
    """An RFC 8941 List of Items: [(bare item, {param: value})]; a string
    is a str, a token a Token."""
    p = _SF(text)
    return p.list()


def sf_field(resp, name):
    """Header name of resp (all its field lines joined, as RFC 8941 says)
    as one Item: (bare item, params); fails unless there is exactly one
    member."""
    lines = resp.header_all(name)
    assert lines, "no %s: %r" % (name, resp)
    members = sf_list(", ".join(lines))
    assert len(members) == 1, (name, members, resp)
    return members[0]


def test_sf_parser():
    """The parser the draft cases read RateLimit and RateLimit-Policy
    with (runs without idemgate)."""
    assert sf_list('"default";q=5;w=60') == [("default", {"q": 5, "w": 60})]
    assert sf_list('"default";r=0;t=12') == [("default", {"r": 0, "t": 12})]
    assert sf_list('  "a\\"b";x; y=?0;z=tok ,\t"c";d=1.5 ') == [
        ('a"b', {"x": True, "y": False, "z": "tok"}), ("c", {"d": 1.5})]
    tok, _ = sf_list("default;q=1")[0]
    assert isinstance(tok, Token)
    s, _ = sf_list('"default";q=1')[0]
    assert not isinstance(s, Token)
    for bad in ('"default', '"a";Q=1', '"a",', '"a" "b"', '"a";q=1234567890123456',
                '"a\\x"', "(1 2)"):
        with pytest.raises(SFError):
            sf_list(bad)


# -- the upstream's own measure ---------------------------------------------------


def test_upstream_reports_max_in_flight(upstream):
    """upstream.py's max_in_flight sees requests it holds at once (the
    concurrency cases would otherwise pass whatever idemgate did)."""
    assert upstream.stats()["in_flight"] == 0
    assert upstream.max_in_flight() == 0
    held = [Bg(request, upstream.port, "POST", SLOW % 1500, hdrs("up-%d" % i), BODY)
            for i in range(3)]
    assert wait_until(lambda: upstream.in_flight() == 3, 10), upstream.stats()
    for b in held:
        assert b.result().status == 201
    assert wait_until(lambda: upstream.in_flight() == 0, 5), upstream.stats()
    assert upstream.max_in_flight() == 3
    upstream.reset()
    assert upstream.max_in_flight() == 0
    assert request(upstream.port, "GET", "/count").status == 201
    assert upstream.max_in_flight() == 1


# -- starting idemgate -----------------------------------------------------------


def rl(**kw):
    """A `ratelimit` block: enabled, with these keys."""
    return dict({"enabled": True}, **kw)


@pytest.fixture
def store(request):
    """The store settings (config.store_config) for request.param,
    "memory" (the default) or "redis" (then the redis fixture is
    started)."""
    kind = getattr(request, "param", "memory")
    redis = request.getfixturevalue("redis") if kind == "redis" else None
    return store_config(kind, redis)


@pytest.fixture
def gate(idemgate, upstream):
    """gate(store_cfg, ratelimit, idem=None, admin=False, **top) -> a
    procs.Idemgate on the test's upstream with that ratelimit block; with
    admin an admin listener on a free port (its port: .admin)."""
    def start(store_cfg, ratelimit, idem=None, admin=False, **top):
        cfg = gate_config(store_cfg, upstream.url, idem, **top)
        if ratelimit is not None:
            cfg = merge(cfg, {"ratelimit": ratelimit})
        port = None
        if admin:
            port = free_port()
            cfg = merge(cfg, {"admin": {"listen": "127.0.0.1:%d" % port}})
        g = idemgate(cfg)
        if admin:
            assert wait_port(port, proc=g.proc), g.stderr()
            g.admin = port
        return g
    return start


def stores():
    return pytest.mark.parametrize("store", STORE_IDS, indirect=True)


# -- reading the answers ---------------------------------------------------------


def rl_names(resp):
    return [k.lower() for k, _ in resp.headers if k.lower().startswith("ratelimit")]


def assert_no_rl_headers(resp):
    assert rl_names(resp) == [], resp


def legacy(resp, limit, window, remaining=None):
    """The legacy headers of resp, checked: one of each, whole numbers,
    Limit == limit, Remaining == remaining (when given), Reset in [1,
    window]; no draft header. Returns (remaining, reset)."""
    vals = {}
    for name in LEGACY:
        got = resp.header_all(name)
        assert len(got) == 1, (name, resp)
        assert re.fullmatch(r"\d+", got[0].strip()), (name, got, resp)
        vals[name] = int(got[0])
    assert not [n for n in rl_names(resp) if n in DRAFT], resp
    assert vals["ratelimit-limit"] == limit, resp
    if remaining is not None:
        assert vals["ratelimit-remaining"] == remaining, resp
    assert 0 <= vals["ratelimit-remaining"] < limit, resp
    assert 1 <= vals["ratelimit-reset"] <= window, resp
    return vals["ratelimit-remaining"], vals["ratelimit-reset"]


def draft(resp, limit, window, remaining=None):
    """The draft headers of resp, parsed as structured fields and checked:
    RateLimit-Policy "default";q=limit;w=window, RateLimit "default";r;t
    (r == remaining when given, t in [1, window]); no legacy header.
    Returns (r, t)."""
    name, pol = sf_field(resp, "RateLimit-Policy")
    assert name == "default" and not isinstance(name, Token), (name, resp)
    assert pol.get("q") == limit and pol.get("w") == window, (pol, resp)
    rname, rp = sf_field(resp, "RateLimit")
    assert rname == name and not isinstance(rname, Token), (rname, resp)
    r, t = rp.get("r"), rp.get("t")
    assert isinstance(r, int) and not isinstance(r, bool), (rp, resp)
    assert isinstance(t, int) and not isinstance(t, bool), (rp, resp)
    if remaining is not None:
        assert r == remaining, (rp, resp)
    assert 0 <= r < limit, (rp, resp)
    assert 1 <= t <= window, (rp, resp)
    assert not [n for n in rl_names(resp) if n in LEGACY], resp
    return r, t


def retry_after(resp):
    v = resp.header_all("Retry-After")
    assert len(v) == 1 and re.fullmatch(r"\d+", v[0]), resp
    return int(v[0])


def assert_rate_429(resp, requests=None, window=None):
    """429 rate_limit_exceeded, Retry-After whole seconds >= 1 (at most the
    emission interval window/requests, rounded up, when given). Returns
    Retry-After."""
    assert_error(resp, 429, "rate_limit_exceeded")
    ra = retry_after(resp)
    assert ra >= 1, resp
    if requests:
        assert ra <= math.ceil(window / requests), resp
    return ra


def assert_conc_429(resp):
    assert_error(resp, 429, "concurrency_limit_exceeded")
    assert resp.header("Retry-After") == "1", resp


def executed(resp, key=None):
    """A first execution of /count: 201, not a replay, n == 1."""
    assert resp.status == 201 and not resp.replayed, resp
    if key is not None:
        assert resp.json() == {"n": 1, "key": key}, resp


def cred(api_key):
    return [("Authorization", "Bearer " + api_key)]


def get(port, path, api_key="k1"):
    """A GET (passthrough) with the credential of api_key (None: none)."""
    return request(port, "GET", path, cred(api_key) if api_key else [])


def while_no_slot(fn, timeout=5.0):
    """fn() again while it answers 429 concurrency_limit_exceeded: a slot
    is given back once the answer is complete, which a client may see a
    moment after it read that answer."""
    return retry_while(fn, lambda r: r.status == 429
                       and b"concurrency_limit_exceeded" in r.body, timeout, 0.05)


# -- 1. rate: a burst, then 429, then the refill ----------------------------------


@pytest.mark.parametrize(("store", "proto"), [("memory", "h1"), ("redis", "h1"),
                                              ("memory", "h2")],
                         indirect=True, ids=["memory-h1", "redis-h1", "memory-h2"])
def test_burst_then_429(gate, upstream, store, proto):
    """requests 5 per 60 s: 5 pass at once, Remaining 4..0; the 6th is 429
    rate_limit_exceeded, Retry-After in [1, 12], Remaining 0, Reset >=
    Retry-After; it was not forwarded. Over HTTP/2: the same, with the
    header names in lowercase."""
    g = gate(store, rl(requests=5, window_seconds=60, concurrent=0))
    for i in range(5):
        r = proto.post(g.port, "/count", "b-%d" % i)
        executed(r, "b-%d" % i)
        legacy(r, 5, 60, remaining=4 - i)
    r = proto.post(g.port, "/count", "b-5")
    ra = assert_rate_429(r, 5, 60)
    _, reset = legacy(r, 5, 60, remaining=0)
    assert reset >= ra, r
    assert upstream.count("b-5") == 0
    assert upstream.stats()["total"] == 5
    if proto.h2:
        names = [k for k, _ in r.headers]
        assert names == [k.lower() for k in names], r
        assert {"retry-after", "ratelimit-limit", "ratelimit-remaining",
                "ratelimit-reset"} <= set(names), r


@stores()
def test_refill_after_emission_interval(gate, upstream, store):
    """requests 5 per 1 s (one more every 200 ms): requests until the
    first 429 (Retry-After 1: 200 ms rounded up), then ten more at once:
    refused ones consume nothing, so 200 ms after the last answer one
    passes again."""
    g = gate(store, rl(requests=5, window_seconds=1, concurrent=0))
    passed = 0
    for i in range(40):
        r = post(g.port, "/count", "rf-%d" % i)
        if r.status == 429:
            break
        executed(r)
        passed += 1
    assert r.status == 429, "never refused after 40 requests"
    assert passed >= 5
    assert assert_rate_429(r, 5, 1) == 1
    legacy(r, 5, 1, remaining=0)
    for j in range(10):
        r = post(g.port, "/count", "rf-more-%d" % j)
        assert r.status in (201, 429), r
    time.sleep(0.2 + 0.05)  # one emission interval after the last answer
    r = post(g.port, "/count", "rf-after")
    executed(r, "rf-after")
    legacy(r, 5, 1)


@stores()
def test_limit_is_per_scope(gate, upstream, store):
    """One allowance per credential, and one per client address for
    requests without one: k1 spent leaves k2, X-API-Key k1 and anonymous
    requests their own."""
    g = gate(store, rl(requests=3, window_seconds=60, concurrent=0))
    for i in range(3):
        executed(post(g.port, "/count", "s1-%d" % i))
    assert_rate_429(post(g.port, "/count", "s1-x"))
    assert_rate_429(get(g.port, "/count"))  # count all: a GET of k1 too
    r = post(g.port, "/count", "s2-0", api_key="k2")
    executed(r)
    legacy(r, 3, 60, remaining=2)
    r = post(g.port, "/count", "s3-0", api_key=None, extra=[("X-API-Key", "k1")])
    executed(r)
    legacy(r, 3, 60, remaining=2)
    # no credential: limited per client address (127.0.0.1)
    for i in range(3):
        r = post(g.port, "/count", "an-%d" % i, api_key=None)
        executed(r)
        legacy(r, 3, 60, remaining=2 - i)
    assert_rate_429(post(g.port, "/count", "an-x", api_key=None))
    assert_rate_429(get(g.port, "/count", api_key=None))
    assert upstream.count("s1-x") == upstream.count("an-x") == 0
    # k2 still has its own
    r = post(g.port, "/count", "s2-1", api_key="k2")
    executed(r)
    legacy(r, 3, 60, remaining=1)


def test_anonymous_scope_is_the_client_address(gate, upstream):
    """Requests without a credential from another address of this host
    have their own allowance."""
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address: a second client address cannot be made")
    port = free_port()
    g = gate({"store": "memory"}, rl(requests=2, window_seconds=60, concurrent=0),
             listen="0.0.0.0:%d" % port)
    for i in range(2):
        executed(request(port, "POST", "/count", hdrs("lo-%d" % i, api_key=None), BODY))
    assert_rate_429(request(port, "POST", "/count", hdrs("lo-x", api_key=None), BODY))
    r = request(port, "POST", "/count", hdrs("ext-0", api_key=None), BODY, host=addr)
    executed(r)
    legacy(r, 2, 60, remaining=1)
    assert g.alive()


def test_scope_follows_scope_headers(gate, upstream):
    """With scope_headers [X-Tenant] the tenant is the scope: two
    Authorization values of one tenant share its allowance."""
    g = gate({"store": "memory"}, rl(requests=2, window_seconds=60, concurrent=0),
             idem={"scope_headers": ["X-Tenant"]})
    executed(post(g.port, "/count", "t-0", api_key="a", extra=[("X-Tenant", "t1")]))
    executed(post(g.port, "/count", "t-1", api_key="b", extra=[("X-Tenant", "t1")]))
    assert_rate_429(post(g.port, "/count", "t-2", api_key="c", extra=[("X-Tenant", "t1")]))
    executed(post(g.port, "/count", "t-3", api_key="a", extra=[("X-Tenant", "t2")]))


# -- 2. count: covered / all ------------------------------------------------------


@stores()
def test_count_covered_ignores_uncovered(gate, upstream, store):
    """count "covered": GETs and POSTs without a key are never limited;
    the covered ones get the whole allowance."""
    g = gate(store, rl(requests=3, window_seconds=60, concurrent=0, count="covered"))
    for i in range(6):
        assert get(g.port, "/count").status == 201
        assert post(g.port, "/count", None).status == 201
    for i in range(3):
        r = post(g.port, "/count", "cv-%d" % i)
        executed(r)
        legacy(r, 3, 60, remaining=2 - i)
    assert_rate_429(post(g.port, "/count", "cv-x"))
    # still not limited
    assert get(g.port, "/count").status == 201
    assert post(g.port, "/count", None).status == 201
    assert upstream.count("cv-x") == 0
    assert upstream.stats()["total"] == 6 * 2 + 3 + 2


@stores()
def test_count_all_counts_passthrough(gate, upstream, store):
    """count "all": GETs count and are refused when the scope is spent,
    and so is a covered request after them."""
    g = gate(store, rl(requests=3, window_seconds=60, concurrent=0, count="all"))
    for i in range(2):
        r = get(g.port, "/count")
        assert r.status == 201, r
        legacy(r, 3, 60, remaining=2 - i)
    r = post(g.port, "/count", None)  # no key: passthrough, counted
    assert r.status == 201, r
    legacy(r, 3, 60, remaining=0)
    r = get(g.port, "/count")
    assert_rate_429(r)
    legacy(r, 3, 60, remaining=0)
    assert_rate_429(post(g.port, "/count", "ca-x"))
    assert upstream.stats()["total"] == 3
    assert upstream.count("ca-x") == 0


# -- 3. what counts, what is forwarded -------------------------------------------


@stores()
def test_replays_and_409s_count(gate, upstream, store):
    """requests 4: an execution, its replay, a mismatch 409 and another
    execution spend the 4; then a new key and a replay are both 429,
    neither forwarded."""
    g = gate(store, rl(requests=4, window_seconds=60, concurrent=0))
    first = post(g.port, "/count", "rc-1")
    executed(first, "rc-1")
    legacy(first, 4, 60, remaining=3)
    replay = post(g.port, "/count", "rc-1")  # no retry: a 409 would count
    assert_replay_of(replay, first, FRESH_EXCLUDE)
    legacy(replay, 4, 60, remaining=2)
    r = post(g.port, "/count", "rc-1", body=b'{"amount": 7}')
    assert_error(r, 409, "idempotency_key_reuse")
    legacy(r, 4, 60, remaining=1)
    r = post(g.port, "/count", "rc-2")
    executed(r, "rc-2")
    legacy(r, 4, 60, remaining=0)
    r = post(g.port, "/count", "rc-3")
    assert_rate_429(r)
    legacy(r, 4, 60, remaining=0)
    r = post(g.port, "/count", "rc-1")
    assert_rate_429(r)
    assert upstream.count("rc-1") == 1 and upstream.count("rc-2") == 1
    assert upstream.count("rc-3") == 0
    assert upstream.stats()["total"] == 2


# -- 4. headers ---------------------------------------------------------------------


@stores()
def test_draft_headers(gate, upstream, store):
    """headers "draft": RateLimit-Policy and RateLimit as structured fields,
    r counting down to 0, on the 429 too; no legacy header."""
    g = gate(store, rl(requests=3, window_seconds=60, concurrent=0, headers="draft"))
    for i in range(3):
        r = post(g.port, "/count", "dr-%d" % i)
        executed(r)
        draft(r, 3, 60, remaining=2 - i)
    r = post(g.port, "/count", "dr-x")
    ra = assert_rate_429(r, 3, 60)
    _, t = draft(r, 3, 60, remaining=0)
    assert t >= ra, r
    r = get(g.port, "/count")
    assert_rate_429(r)
    draft(r, 3, 60, remaining=0)


def test_headers_none(gate, upstream):
    """headers "none": the limit holds, no RateLimit header on any answer
    (the 429 still has Retry-After)."""
    g = gate({"store": "memory"}, rl(requests=2, window_seconds=60, concurrent=0,
                                     headers="none"))
    for i in range(2):
        r = post(g.port, "/count", "hn-%d" % i)
        executed(r)
        assert_no_rl_headers(r)
    r = post(g.port, "/count", "hn-x")
    assert_rate_429(r)
    assert_no_rl_headers(r)


def test_disabled_by_default(gate, upstream):
    """Without a ratelimit block (enabled: false by default) nothing is
    limited and no answer carries a RateLimit header."""
    g = gate({"store": "memory"}, None)
    for i in range(30):
        r = post(g.port, "/count", "off-%d" % i)
        executed(r)
        assert_no_rl_headers(r)
    r = get(g.port, "/count")
    assert r.status == 201 and rl_names(r) == [], r


@pytest.mark.parametrize("mode", ["legacy", "draft"])
@stores()
def test_replay_headers_are_fresh(gate, upstream, store, mode):
    """A replay's RateLimit headers are computed for it (Remaining one
    lower than the first answer's, then one lower again), one of each,
    with the RateLimit names left out of replay_exclude_headers (a kept
    copy must not come back beside or instead of the fresh one; that none
    is kept at all is seen in the reload case, once the limit is off)."""
    g = gate(store, rl(requests=5, window_seconds=60, concurrent=0, headers=mode),
             idem={"replay_exclude_headers": ["Set-Cookie", "Date", "Server"]})
    check = legacy if mode == "legacy" else draft
    first = post(g.port, "/count", "fr-1")
    executed(first, "fr-1")
    assert check(first, 5, 60, remaining=4)[0] == 4
    replay = post(g.port, "/count", "fr-1")
    assert_replay_of(replay, first, FRESH_EXCLUDE)
    check(replay, 5, 60, remaining=3)
    replay2 = post(g.port, "/count", "fr-1")
    assert_replay_of(replay2, first, FRESH_EXCLUDE)
    check(replay2, 5, 60, remaining=2)


def upstream_headers_path(pairs):
    """/headers?set=Name:Value&... (the upstream answers with them)."""
    return "/headers?" + "&".join("set=" + quote("%s:%s" % p, safe="") for p in pairs)


@pytest.mark.parametrize("mode", ["legacy", "draft"])
def test_upstream_ratelimit_headers_replaced(gate, upstream, mode):
    """The upstream's own headers under the names idemgate writes are
    replaced by idemgate's (one of each), on a passthrough, on a covered
    answer and on its replay; other headers pass."""
    g = gate({"store": "memory"}, rl(requests=10, window_seconds=60, concurrent=0,
                                     headers=mode),
             idem={"replay_exclude_headers": ["Set-Cookie", "Date", "Server"]})
    if mode == "legacy":
        own = [("RateLimit-Limit", "999"), ("RateLimit-Remaining", "998"),
               ("RateLimit-Reset", "997")]
        check = legacy
    else:
        own = [("RateLimit-Policy", '"upstream";q=999;w=999'),
               ("RateLimit", '"upstream";r=998;t=997')]
        check = draft
    path = upstream_headers_path(own + [("X-Other", "kept")])
    r = get(g.port, path)
    assert r.status == 200 and r.header("X-Other") == "kept", r
    check(r, 10, 60, remaining=9)
    first = post(g.port, path, "uh-1")
    assert first.status == 200 and first.header("X-Other") == "kept", first
    check(first, 10, 60, remaining=8)
    replay = post(g.port, path, "uh-1")
    assert replay.replayed and replay.header("X-Other") == "kept", replay
    check(replay, 10, 60, remaining=7)


# -- 5. concurrency ------------------------------------------------------------------


@pytest.mark.parametrize("store,workers", [("memory", 2), ("redis", 1)],
                         indirect=["store"], ids=["memory-2w", "redis"])
def test_concurrency_storm(gate, upstream, store, workers):
    """concurrent 3, rate off: 20 clients of one credential at once, each
    its own key on an upstream that holds each request 300 ms. The upstream
    never has more than 3 in flight (and has 3: the storm is enough to
    break a missing limit); the others get 429 concurrency_limit_exceeded,
    Retry-After 1, no RateLimit header, are not forwarded, and their keys
    are not locked: each one's retry executes once."""
    g = gate(store, rl(requests=0, concurrent=3), workers=workers)
    refused, admitted = [], []
    for rnd in range(3):  # a storm whose clients came too late to overlap: again
        keys = ["cs%d-%02d" % (rnd, i) for i in range(20)]
        results = storm_each([g.port], 20, lambda i, keys=keys: (
            SLOW % 300, hdrs(keys[i]), BODY))
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        for key, r in zip(keys, results):
            assert_no_rl_headers(r)
            if r.status == 429:
                assert_conc_429(r)
                refused.append(key)
            else:
                executed(r, key)
                admitted.append(key)
        peak = upstream.max_in_flight()
        assert peak <= 3, (peak, upstream.stats())
        if peak == 3 and refused:
            break
    assert peak == 3, "the upstream never had 3 in flight: %r" % upstream.stats()
    assert refused, "no client was refused"
    assert len(admitted) >= 3
    for key in refused:
        assert upstream.count(key) == 0, key
    # the same requests again, three at a time (the slots there are)
    queue, lock, answers = list(refused), threading.Lock(), {}

    def retry(_):
        while True:
            with lock:
                if not queue:
                    return
                key = queue.pop()
            answers[key] = while_no_slot(lambda: post(g.port, SLOW % 300, key), 10)
    in_threads(retry, 3, 60, "retries")
    for key in refused:
        executed(answers[key], key)
        assert upstream.count(key) == 1, key
    assert upstream.stats()["total"] == len(admitted) + len(refused)
    assert upstream.max_in_flight() <= 3


def test_concurrency_count_all_and_covered(gate, upstream):
    """concurrent 1: with count "all" a passthrough GET holds the scope's
    slot (another GET, a covered POST: 429); with "covered" it does not,
    and a covered request holds it against covered ones only."""
    g = gate({"store": "memory"}, rl(requests=0, concurrent=1, count="all"))
    held = Bg(get, g.port, SLOW % 1000)
    assert wait_until(lambda: upstream.in_flight() == 1, 10), upstream.stats()
    assert_conc_429(get(g.port, "/count"))
    assert_conc_429(post(g.port, "/count", "ua-1"))
    assert upstream.count("ua-1") == 0
    assert held.result().status == 201
    executed(while_no_slot(lambda: post(g.port, "/count", "ua-1")), "ua-1")

    g2 = gate({"store": "memory"}, rl(requests=0, concurrent=1, count="covered"))
    held = Bg(get, g2.port, SLOW % 1000)
    assert wait_until(lambda: upstream.in_flight() == 1, 10), upstream.stats()
    assert get(g2.port, "/count").status == 201
    executed(post(g2.port, "/count", "uc-1"), "uc-1")
    assert held.result().status == 201
    held = Bg(while_no_slot, lambda: post(g2.port, SLOW % 1000, "uc-2"))
    assert wait_until(lambda: upstream.in_flight() == 1, 10), upstream.stats()
    assert_conc_429(post(g2.port, "/count", "uc-3"))
    assert get(g2.port, "/count").status == 201
    executed(held.result(), "uc-2")
    assert upstream.count("uc-3") == 0


# -- 6. replays and 409s while every slot is busy ----------------------------------


@stores()
def test_replay_served_while_slots_busy(gate, upstream, store):
    """concurrent 2, both held by slow requests: a replay is served, a
    retry of a running key is 409 request_in_progress, a mismatch 409
    idempotency_key_reuse, a new key 429; every one of them with the
    RateLimit headers. Afterwards the new key executes."""
    g = gate(store, rl(requests=100, window_seconds=60, concurrent=2))
    first = post(g.port, "/count", "rb-1")
    executed(first, "rb-1")
    slow = [Bg(while_no_slot, lambda k=k: post(g.port, SLOW % 1500, k))
            for k in ("rb-slow-1", "rb-slow-2")]
    assert wait_until(lambda: upstream.in_flight() == 2, 10), upstream.stats()

    replay = post(g.port, "/count", "rb-1")
    assert_replay_of(replay, first, FRESH_EXCLUDE)
    legacy(replay, 100, 60)
    r = post(g.port, SLOW % 1500, "rb-slow-1")
    assert_in_progress(r)
    legacy(r, 100, 60)
    r = post(g.port, "/count", "rb-1", body=b'{"amount": 7}')
    assert_error(r, 409, "idempotency_key_reuse")
    legacy(r, 100, 60)
    r = post(g.port, "/count", "rb-new")
    assert_conc_429(r)
    legacy(r, 100, 60)
    assert upstream.count("rb-new") == 0
    assert upstream.max_in_flight() == 2

    for b in slow:
        executed(b.result())
    executed(while_no_slot(lambda: post(g.port, "/count", "rb-new")), "rb-new")
    assert upstream.count("rb-1") == 1


# -- 7. slot leases -------------------------------------------------------------------


def test_slot_lease_renewed_and_freed_after_kill(idemgate, upstream, redis):
    """Redis, lock_seconds 2, concurrent 2: A holds both slots with
    requests of 6 s. Past lock_seconds the slots are still A's (renewed
    with the locks): B, on the same Redis, gets 429 concurrency. A is
    SIGKILLed: within about lock_seconds B's request passes."""
    cfg = gate_config({"store": "redis", "redis": {"url": redis.url}}, upstream.url,
                      {"lock_seconds": 2}, ratelimit=rl(requests=0, concurrent=2))
    a = idemgate(cfg)
    b = idemgate(cfg)
    for k in ("ls-1", "ls-2"):
        Bg(post, a.port, SLOW % 6000, k, timeout=20)
    assert wait_until(lambda: upstream.in_flight() == 2, 10), upstream.stats()
    assert_conc_429(post(b.port, "/count", "ls-b"))
    time.sleep(2.5)  # longer than lock_seconds: only a renewal keeps a slot
    assert_conc_429(post(b.port, "/count", "ls-b"))
    assert_conc_429(post(a.port, "/count", "ls-a"))
    assert upstream.count("ls-b") == 0 and upstream.count("ls-a") == 0
    a.kill()
    t0 = time.monotonic()
    r = while_no_slot(lambda: post(b.port, "/count", "ls-b"), timeout=8)
    print("slots came back %.1f s after the kill" % (time.monotonic() - t0))
    executed(r, "ls-b")


# -- 8. two instances, one Redis, one limit -------------------------------------


def test_two_instances_share_the_rate(idemgate, upstream, redis):
    """requests 6 per 60 s on two instances of one Redis: 12 requests
    alternating between them, 6 admitted, Remaining counting down across
    both; the other 6 are 429 and never forwarded."""
    cfg = gate_config({"store": "redis", "redis": {"url": redis.url}}, upstream.url,
                      ratelimit=rl(requests=6, window_seconds=60, concurrent=0))
    a, b = idemgate(cfg), idemgate(cfg)
    admitted = []
    for i in range(12):
        port = (a, b)[i % 2].port
        r = post(port, "/count", "ti-%d" % i)
        if r.status == 201:
            executed(r)
            legacy(r, 6, 60, remaining=5 - len(admitted))
            admitted.append(i)
        else:
            assert_rate_429(r, 6, 60)
            legacy(r, 6, 60, remaining=0)
    assert admitted == list(range(6)), admitted
    assert upstream.stats()["total"] == 6


@pytest.mark.parametrize("setup", ["memory-2workers", "redis-2instances"])
def test_burst_admits_exactly_requests(idemgate, upstream, request, setup):
    """24 clients at once, one credential, each its own key: exactly
    `requests` (6) admitted, whatever worker or instance each reached; the
    rest 429 rate_limit_exceeded."""
    lim = rl(requests=6, window_seconds=60, concurrent=0)
    if setup == "memory-2workers":
        g = idemgate(gate_config({"store": "memory"}, upstream.url, workers=2,
                                 ratelimit=lim))
        ports = [g.port]
    else:
        redis = request.getfixturevalue("redis")
        cfg = gate_config({"store": "redis", "redis": {"url": redis.url}},
                          upstream.url, ratelimit=lim)
        ports = [idemgate(cfg).port, idemgate(cfg).port]
    results = storm_each(ports, 24, lambda i: ("/count", hdrs("bu-%02d" % i), BODY))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    ok = [r for r in results if r.status == 201]
    for r in results:
        if r.status == 201:
            executed(r)
        else:
            assert_rate_429(r, 6, 60)
    assert len(ok) == 6, [r.status for r in results]
    assert upstream.stats()["total"] == 6
    assert sorted(legacy(r, 6, 60)[0] for r in ok) == [0, 1, 2, 3, 4, 5]


# -- 9. per-route settings ---------------------------------------------------------


def test_route_overrides_key_by_key(gate, upstream):
    """Global requests 100 per 30 s; /tight has requests 2 (the window and
    the headers inherited), /draft headers draft and requests 3, /free
    enabled false."""
    g = gate({"store": "memory"}, rl(requests=100, window_seconds=30, concurrent=0),
             routes=[{"prefix": "/tight", "ratelimit": {"requests": 2}},
                     {"prefix": "/draft", "ratelimit": {"headers": "draft", "requests": 3}},
                     {"prefix": "/free", "ratelimit": {"enabled": False}}])
    # one credential per route: whether a route's limit shares the global
    # one's state for a credential is not what this case is about
    for i in range(2):
        r = post(g.port, "/tight/count", "rt-%d" % i, api_key="kt")
        assert r.status == 200, r  # /tight/count is the echo
        legacy(r, 2, 30, remaining=1 - i)
    r = post(g.port, "/tight/count", "rt-x", api_key="kt")
    assert_rate_429(r, 2, 30)
    legacy(r, 2, 30, remaining=0)
    for i in range(3):
        r = post(g.port, "/draft/x", "rd-%d" % i, api_key="kd")
        assert r.status == 200, r
        draft(r, 3, 30, remaining=2 - i)
    assert_rate_429(post(g.port, "/draft/x", "rd-x", api_key="kd"), 3, 30)
    for i in range(10):
        r = post(g.port, "/free/x", "rf-%d" % i, api_key="kf")
        assert r.status == 200, r
        assert_no_rl_headers(r)
    for i in range(3):
        r = post(g.port, "/count", "rg-%d" % i, api_key="kg")
        executed(r)
        rem, _ = legacy(r, 100, 30)  # one more every 0.3 s: not counted exactly
        assert 97 <= rem <= 99, r


def test_route_enables_what_global_leaves_off(gate, upstream):
    """The global limit off (the default), one route's on: only that
    route is limited and carries the headers."""
    g = gate({"store": "memory"}, None,
             routes=[{"prefix": "/on", "ratelimit": {"enabled": True, "requests": 2,
                                                     "window_seconds": 10}}])
    for i in range(2):
        r = post(g.port, "/on/x", "on-%d" % i)
        assert r.status == 200, r
        legacy(r, 2, 10, remaining=1 - i)
    assert_rate_429(post(g.port, "/on/x", "on-x"), 2, 10)
    for i in range(10):
        r = post(g.port, "/count", "off-%d" % i)
        executed(r)
        assert_no_rl_headers(r)


# -- 10. metrics and access lines ---------------------------------------------------


def test_metrics_and_access_lines(gate, upstream):
    """A rate refusal (k1: requests 3 spent) and a concurrency refusal
    (k2: concurrent 2 held, rate left): idemgate_ratelimited_total{reason}
    +1 each, idemgate_requests_total{outcome="rate_limited"} +2, and one
    access line each, status 429, outcome rate_limited, with its key."""
    g = gate({"store": "memory"}, rl(requests=3, window_seconds=60, concurrent=2),
             admin=True)
    m0 = metrics(g.admin)
    assert m0.get(OUTCOME) == 0, "outcome rate_limited is not on /metrics from the start"
    for i in range(3):
        executed(post(g.port, "/count", "mr-%d" % i))
    assert_rate_429(post(g.port, "/count", "mr-rate"))
    held = [Bg(post, g.port, SLOW % 1500, "mc-slow-%d" % i, api_key="k2") for i in range(2)]
    assert wait_until(lambda: upstream.in_flight() == 2, 10), upstream.stats()
    assert_conc_429(post(g.port, "/count", "mc-conc", api_key="k2"))
    for b in held:
        executed(b.result())

    def counted():
        m = metrics(g.admin)
        return (m.get(RATE, 0) - m0.get(RATE, 0), m.get(CONC, 0) - m0.get(CONC, 0),
                m.get(OUTCOME, 0) - m0.get(OUTCOME, 0))
    assert wait_until(lambda: counted() == (1, 1, 2), 5), (counted(), metrics(g.admin))
    m = metrics(g.admin)
    assert RATE in m and CONC in m, sorted(k for k in m if "ratelimited" in k)

    def limited():
        return {ln.get("key"): ln for ln in g.access_lines()
                if ln.get("outcome") == "rate_limited"}
    assert wait_until(lambda: set(limited()) == {"mr-rate", "mc-conc"}, 5), g.stderr()[-3000:]
    for key, ln in limited().items():
        assert ln["status"] == 429 and ln["method"] == "POST", ln
        assert ln.get("upstream_ms", 0) == 0 and "upstream_addr" not in ln, ln
    outcomes = [ln.get("outcome") for ln in g.access_lines()]
    assert outcomes.count("rate_limited") == 2, outcomes


# -- 12. reload ---------------------------------------------------------------------


def reload(g, how):
    """Reloads g (SIGHUP or POST /-/reload) and waits until
    idemgate_reloads_total{result="ok"} counted it."""
    before = metrics(g.admin).get(RELOAD_OK, 0)
    if how == "post":
        r = request(g.admin, "POST", "/-/reload")
        assert r.status == 200 and r.json().get("result") == "ok", r
    else:
        g.proc.send_signal(signal.SIGHUP)

    def done():
        assert g.alive(), g.stderr()[-3000:]
        return metrics(g.admin).get(RELOAD_OK, 0) == before + 1
    assert wait_until(done, 10), g.stderr()[-3000:]


@pytest.mark.parametrize("how", ["sighup", "post"])
def test_reload_enables_changes_and_disables(gate, upstream, how):
    """Off at start (no 429, no header); enabled by a reload (requests 2:
    the third is 429); requests 4 after another; off again after a
    third, when the replay of a key executed under the limit carries no
    RateLimit header (none was kept with its record: the RateLimit names
    are left out of replay_exclude_headers, so a kept one would show). A
    new credential after each reload: what a change of the numbers does to
    a scope's spent allowance is not checked here."""
    g = gate({"store": "memory"}, None, admin=True,
             idem={"replay_exclude_headers": ["Set-Cookie", "Date", "Server"]})
    for i in range(6):
        r = post(g.port, "/count", "rl0-%d" % i, api_key="r0")
        executed(r)
        assert_no_rl_headers(r)

    g.write_config(merge(g.config, {"ratelimit": rl(requests=2, window_seconds=60,
                                                    concurrent=0)}))
    reload(g, how)
    kept = []
    for i in range(2):
        r = post(g.port, "/count", "rl1-%d" % i, api_key="r1")
        executed(r)
        legacy(r, 2, 60, remaining=1 - i)
        kept.append(r)
    assert_rate_429(post(g.port, "/count", "rl1-x", api_key="r1"), 2, 60)

    g.write_config(merge(g.config, {"ratelimit": {"requests": 4}}))
    reload(g, how)
    for i in range(4):
        legacy(post(g.port, "/count", "rl2-%d" % i, api_key="r2"), 4, 60, remaining=3 - i)
    assert_rate_429(post(g.port, "/count", "rl2-x", api_key="r2"), 4, 60)

    g.write_config(merge(g.config, {"ratelimit": {"enabled": False}}))
    reload(g, how)
    for i in range(6):
        r = post(g.port, "/count", "rl3-%d" % i, api_key="r1")
        executed(r)
        assert_no_rl_headers(r)
    replay = post(g.port, "/count", "rl1-0", api_key="r1")
    assert_replay_of(replay, kept[0], FRESH_EXCLUDE)
    assert_no_rl_headers(replay)
    assert upstream.count("rl1-x") == upstream.count("rl2-x") == 0
    assert upstream.count("rl1-0") == 1


# -- 13. -t ---------------------------------------------------------------------------


def write_cfg(tmp_path, cfg, name="cfg.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return str(p)


def base_cfg():
    return {"listen": "127.0.0.1:%d" % free_port(), "store": "memory",
            "upstream": "http://127.0.0.1:9", "workers": 1, "admin": {"listen": "off"}}


def test_config_valid_and_defaults(tmp_path):
    """Every key, globally and on a route, passes -t; -T shows the
    defaults."""
    cfg = merge(base_cfg(), {"ratelimit": {"enabled": True, "requests": 0,
                                           "window_seconds": 1, "concurrent": 3,
                                           "count": "covered", "headers": "draft"},
                             "routes": [{"prefix": "/a", "ratelimit": {"headers": "none"}},
                                        {"prefix": "/b", "ratelimit": {"count": "all",
                                                                       "headers": "legacy",
                                                                       "requests": 5}}]})
    res = run_idemgate(["-c", write_cfg(tmp_path, cfg), "-t"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "configuration ok"
    res = run_idemgate(["-c", write_cfg(tmp_path, base_cfg(), "plain.json"), "-T"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ratelimit"] == DEFAULTS


@pytest.mark.parametrize(("patch", "key"), [
    ({"ratelimit": {"window_seconds": 0}}, "ratelimit.window_seconds"),
    ({"ratelimit": {"count": "x"}}, "ratelimit.count"),
    ({"ratelimit": {"headers": "y"}}, "ratelimit.headers"),
    ({"ratelimit": {"requests": -1}}, "ratelimit.requests"),
    ({"ratelimit": {"concurrent": -1}}, "ratelimit.concurrent"),
    ({"ratelimit": {"requests": "5"}}, "ratelimit.requests"),
    ({"ratelimit": {"enabled": "yes"}}, "ratelimit.enabled"),
    ({"ratelimit": {"burst": 5}}, "ratelimit.burst"),
    ({"routes": [{"prefix": "/a", "ratelimit": {"window_seconds": 0}}]},
     "routes[0].ratelimit.window_seconds"),
    ({"routes": [{"prefix": "/a"}, {"prefix": "/b", "ratelimit": {"count": "some"}}]},
     "routes[1].ratelimit.count"),
], ids=["window_0", "count_x", "headers_y", "requests_neg", "concurrent_neg",
        "requests_str", "enabled_str", "unknown_key", "route_window_0", "route_count"])
def test_config_invalid_names_the_key(tmp_path, patch, key):
    res = run_idemgate(["-c", write_cfg(tmp_path, merge(base_cfg(), patch)), "-t"])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith("config:") and key in lines[0], (key, lines[0])


# -- the store failing ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_down_failure_mode(gate, upstream, redis, mode):
    """Redis gone: failure_mode closed answers 503 store_unavailable
    (nothing forwarded), a passthrough GET of the limited scope too (count
    "all": its limit needs the store); open forwards every request, past
    the limit."""
    g = gate({"store": "redis", "redis": {"url": redis.url, "failure_mode": mode}},
             rl(requests=2, window_seconds=60, concurrent=1))
    executed(retry_while(lambda: post(g.port, "/count", "fm-0"),
                         lambda r: r.status == 503, 10, 0.1))
    redis.kill()
    if mode == "closed":
        r = post(g.port, "/count", "fm-1")
        assert_error(r, 503, "store_unavailable")
        assert r.header("Retry-After") == "1", r
        assert upstream.count("fm-1") == 0
        r = get(g.port, "/count")
        assert r.status == 503, ("closed: a limited GET whose limit cannot be "
                                 "checked is refused too", r)
        assert_error(r, 503, "store_unavailable")
        assert upstream.stats()["total"] == 1
    else:
        for i in range(1, 5):
            r = post(g.port, "/count", "fm-%d" % i)
            assert r.status == 201 and not r.replayed, r
            assert upstream.count("fm-%d" % i) == 1
        for _ in range(3):
            assert get(g.port, "/count").status == 201
    assert g.alive()
