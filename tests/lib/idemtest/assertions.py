"""What the tests check, and the bounded waits they check it after.

Owns: the docs/errors.md error checks (ERROR_TYPES, error_code(),
assert_error(), assert_in_progress(), assert_lost_replay()); replay
comparison (e2e_headers(), assert_replay_of()); wait_until() (the one
bounded poll) and retry_while() (the one bounded retry) with
after_release(), first_answer() and wait_upstream_saw().
"""

import json
import time

from .http import post

# docs/errors.md: code -> type.
ERROR_TYPES = {
    "idempotency_key_required": "invalid_request_error",
    "invalid_idempotency_key": "invalid_request_error",
    "bad_request": "invalid_request_error",
    "credentials_required": "invalid_request_error",
    "invalid_signature": "invalid_request_error",
    "request_in_progress": "idempotency_error",
    "idempotency_key_reuse": "idempotency_error",
    "payload_too_large": "invalid_request_error",
    "upstream_unavailable": "api_error",
    "store_unavailable": "api_error",
    "upstream_timeout": "api_error",
    "upstream_answer_lost": "api_error",
    "rate_limit_exceeded": "rate_limit_error",
    "concurrency_limit_exceeded": "rate_limit_error",
}

HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding",
              "upgrade", "proxy-connection", "proxy-authenticate"}

DEFAULT_REPLAY_EXCLUDE = {"set-cookie", "date", "server", "ratelimit-limit",
                          "ratelimit-remaining", "ratelimit-reset"}


# -- docs/errors.md errors -------------------------------------------------


def error_code(body):
    """The error code (docs/errors.md) in an error body (JSON {"error": {"code"}} or
    problem+json {"code"}), or None."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return doc["error"].get("code")
    if isinstance(doc, dict):
        return doc.get("code")
    return None


def assert_error(resp, status, code, problem=False):
    """Checks one idemgate-generated error: status, content type, and the
    JSON body shape with the docs/errors.md type for code."""
    assert resp.status == status, resp
    assert not resp.replayed, resp
    ctype = (resp.header("Content-Type") or "").split(";")[0].strip().lower()
    try:
        doc = json.loads(resp.body)
    except ValueError as e:
        raise AssertionError("error body is not JSON: %r (%s)" % (resp.body, e))
    if problem:
        assert ctype == "application/problem+json", resp
        for member in ("type", "title", "status", "detail", "code"):
            assert member in doc, (member, doc)
        assert doc["status"] == status, doc
        assert doc["code"] == code, doc
        assert isinstance(doc["type"], str) and doc["type"], doc
        assert isinstance(doc["title"], str) and doc["title"], doc
        assert isinstance(doc["detail"], str), doc
    else:
        assert ctype == "application/json", resp
        assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), doc
        err = doc["error"]
        assert err.get("code") == code, doc
        assert err.get("type") == ERROR_TYPES[code], doc
        assert isinstance(err.get("message"), str) and err["message"], doc
    return doc


def assert_in_progress(resp, problem=False):
    assert_error(resp, 409, "request_in_progress", problem)
    assert resp.header("Retry-After") == "1", resp


def assert_one_fresh(answers, status, assert_replay):
    """Of answers to one key and body sent at once: exactly one executed
    (status, not replayed), every other one is 409 request_in_progress or,
    by assert_replay(other, executed), a replay of it. Returns the one
    executed."""
    fresh = [r for r in answers if r.status == status and not r.replayed]
    assert len(fresh) == 1, answers
    for r in answers:
        if r is fresh[0]:
            continue
        if r.status == 409:
            assert_in_progress(r)
        else:
            assert_replay(r, fresh[0])
    return fresh[0]


def assert_lost_replay(r):
    """502 upstream_answer_lost, replayed (a key kept as lost)."""
    assert r.status == 502, r
    assert r.header("Idempotent-Replayed") == "true", r
    assert r.json()["error"]["code"] == "upstream_answer_lost", r
    assert r.json()["error"]["type"] == "api_error", r


# -- replay comparison -----------------------------------------------------


def e2e_headers(resp, exclude=DEFAULT_REPLAY_EXCLUDE):
    """The headers a replay must reproduce in order: everything but
    hop-by-hop, Date, Idempotent-Replayed, X-Request-Id (per request, set by
    idemgate) and the replay_exclude_headers."""
    skip = set(HOP_BY_HOP) | {"date", "idempotent-replayed", "x-request-id"}
    skip |= {h.lower() for h in exclude}
    return [(k.lower(), v) for k, v in resp.headers if k.lower() not in skip]


def assert_replay_of(replay, first, exclude=DEFAULT_REPLAY_EXCLUDE):
    assert first.header("Idempotent-Replayed") is None, first
    assert replay.header("Idempotent-Replayed") == "true", replay
    assert len(replay.header_all("Idempotent-Replayed")) == 1, replay
    assert replay.status == first.status, (first, replay)
    assert replay.reason == first.reason, (first, replay)
    assert replay.body == first.body, (first, replay)
    assert e2e_headers(replay, exclude) == e2e_headers(first, exclude), (
        first.headers, replay.headers)


# -- bounded waits -----------------------------------------------------------


def wait_until(pred, timeout=10.0, interval=0.02):
    """Polls pred until true or timeout; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def retry_while(fn, again, timeout, interval, must=None):
    """Calls fn() until again(answer) is false or timeout seconds have
    passed; returns the last answer. must: a message; then an answer for
    which again still holds at the deadline fails with it."""
    deadline = time.monotonic() + timeout
    while True:
        r = fn()
        if not again(r):
            return r
        if time.monotonic() >= deadline:
            assert not must, "%s: %r" % (must, r)
            return r
        time.sleep(interval)


def _in_progress(r):
    return r.status == 409 and b"request_in_progress" in r.body


def after_release(fn, timeout=5.0, interval=0.05, must=False):
    """Calls fn() again while it answers 409 request_in_progress: the client
    may see the end of a response a moment before the store write that
    follows it (complete or release). The final answer is what the test
    checks; with must (True or a message), still in progress at the
    deadline fails."""
    if must is True:
        must = "still in progress"
    return retry_while(fn, _in_progress, timeout, interval, must or None)


def first_answer(port, key, path="/count", timeout=10.0):
    """The first covered request, retried while the store answers 503 (the
    gateway may still be connecting, or learning the topology)."""
    return retry_while(lambda: post(port, path, key), lambda r: r.status == 503,
                       timeout, 0.1)


def wait_upstream_saw(upstream, key, n=1, timeout=10.0):
    """Waits until the upstream (procs.Upstream) counted n executions of key
    (it counts when the request arrives, before any ?ms sleep)."""
    ok = wait_until(lambda: upstream.count(key) >= n, timeout)
    assert ok, "upstream never saw %d execution(s) of %r: %r" % (
        n, key, upstream.stats())
