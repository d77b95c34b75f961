"""Strict HTTP/1.1 parsing at the edge (docs/errors.md, docs/headers.md): every
malformed request gets an error status and the connection closed, and never
reaches the upstream. Also pipelining.

The cases about a request's fields rather than HTTP/1 framing (heads over
max_header_bytes, too many fields, a field name or value no protocol
allows) run over HTTP/2 too (the `proto` fixture): the same request as
one stream, refused with the same status and body, or as malformed with
a PROTOCOL_ERROR stream reset (RFC 9113 section 8.1.1), and never
forwarded; the connection may stay open."""

import pytest

from idemtest.h2 import PROTOCOL_ERROR
from idemtest.http import parse_responses, raw, raw_closed, request

MAX_HEADER_BYTES = 2048


@pytest.fixture
def gate(idemgate, upstream):
    g = idemgate({"upstream": upstream.url, "store": "memory",
                  "limits": {"max_header_bytes": MAX_HEADER_BYTES}})
    g.upstream = upstream
    return g


def check_rejected(gate, data, statuses=(400,)):
    out, closed = raw_closed(gate.port, data, timeout=5)
    assert out.startswith(b"HTTP/1."), "no HTTP response: %r" % out[:200]
    rs = parse_responses(out)
    assert rs, out
    assert rs[0].status in statuses, "got %d, want %s: %r" % (
        rs[0].status, statuses, out[:300])
    assert len(rs) == 1, "more than one response: %r" % out[:600]
    assert closed, "connection not closed after %d" % rs[0].status
    ctype = rs[0].header("Content-Type") or ""
    assert ctype.startswith("application/json"), rs[0].headers
    if rs[0].status == 400:
        assert rs[0].json()["error"]["code"] == "bad_request", rs[0].body
    assert gate.upstream.stats()["total"] == 0, \
        "the upstream saw a malformed request: %r" % gate.upstream.stats()
    # the proxy survived and still serves well-formed requests
    ok = request(gate.port, "GET", "/echo")
    assert ok.status == 200
    return rs[0]


def as_fields(data):
    """(method, target, [(name, value)]) of a raw HTTP/1.1 request head
    whose lines are well formed (CRLF, "name: value"); the head may lack
    its end."""
    head = data.split(b"\r\n\r\n", 1)[0]
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    fields = [tuple(ln.split(": ", 1)) for ln in lines[1:]]
    return method, target, fields


def check_rejected_over(proto, gate, data, statuses=(400,)):
    """check_rejected() over HTTP/1.1; over HTTP/2 the same request (its
    fields, as_fields(); Host as :authority) on a stream: an error status
    of statuses with the JSON body of HTTP/1.1, or, where 400 is expected,
    the stream reset with PROTOCOL_ERROR as malformed; nothing reaches the
    upstream, and the proxy still serves."""
    if not proto.h2:
        return check_rejected(gate, data, statuses)
    method, target, fields = as_fields(data)
    r = proto.request(gate.port, method, target, fields, allow_reset=True)
    if getattr(r, "reset_code", None) is not None:
        assert 400 in statuses and r.reset_code == PROTOCOL_ERROR, r
    else:
        assert r.status in statuses, "got %d, want %s: %r" % (r.status, statuses, r)
        ctype = r.header("Content-Type") or ""
        assert ctype.startswith("application/json"), r.headers
        assert r.json()["error"]["code"] == "bad_request", r.body
        assert r.header("X-Request-Id"), r
    assert gate.upstream.stats()["total"] == 0, \
        "the upstream saw a malformed request: %r" % gate.upstream.stats()
    ok = proto.request(gate.port, "GET", "/echo")
    assert ok.status == 200
    return r


def test_content_length_and_transfer_encoding(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
                         b"\r\n0\r\n\r\n")


def test_transfer_encoding_then_content_length(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"
                         b"\r\n0\r\n\r\n")


def test_duplicate_content_length(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n"
                         b"hello")


def test_content_length_list(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 5, 5\r\n\r\nhello")


def test_negative_content_length(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: -1\r\n\r\n")


def test_non_numeric_content_length(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 0x10\r\n\r\n")


def test_huge_content_length(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 99999999999999999999999\r\n\r\n",
                   (400, 413))


def test_obs_fold(gate):
    check_rejected(gate, b"GET /echo HTTP/1.1\r\nHost: x\r\n"
                         b"X-A: one\r\n two\r\n\r\n")


def test_bare_lf_line_endings(gate):
    check_rejected(gate, b"GET /echo HTTP/1.1\nHost: x\nX-A: b\n\n")


def test_bare_lf_in_one_header(gate):
    check_rejected(gate, b"GET /echo HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n")


def test_bare_cr(gate):
    check_rejected(gate, b"GET /echo HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n")


def test_space_before_colon(gate):
    check_rejected(gate, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n")


def test_invalid_header_name_char(gate, proto):
    check_rejected_over(proto, gate, b"GET /echo HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n")


def test_invalid_method_chars(gate):
    check_rejected(gate, b"G(T /echo HTTP/1.1\r\nHost: x\r\n\r\n")


def test_lowercase_garbage_method_with_at(gate):
    check_rejected(gate, b"G@T /echo HTTP/1.1\r\nHost: x\r\n\r\n")


def test_request_target_with_space(gate):
    check_rejected(gate, b"GET /echo foo HTTP/1.1\r\nHost: x\r\n\r\n")


def test_request_target_with_control_char(gate):
    check_rejected(gate, b"GET /echo\x01foo HTTP/1.1\r\nHost: x\r\n\r\n")


def test_missing_host_http11(gate):
    check_rejected(gate, b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n")


def test_duplicate_host(gate):
    check_rejected(gate, b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")


def test_http10_without_host_is_fine(gate):
    out = raw(gate.port, b"GET /echo HTTP/1.0\r\n\r\n")
    rs = parse_responses(out)
    assert rs and rs[0].status == 200, out
    assert gate.upstream.stats()["total"] == 1


def test_oversized_head_one_header(gate, proto):
    check_rejected_over(proto, gate, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: "
                        + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n\r\n",
                        (431, 400))


def test_oversized_head_many_headers(gate, proto):
    hdrs = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(60))
    assert len(hdrs) > MAX_HEADER_BYTES
    check_rejected_over(proto, gate, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + hdrs + b"\r\n",
                        (431, 400))


def test_oversized_request_line(gate, proto):
    check_rejected_over(proto, gate, b"GET /echo?" + b"a" * (MAX_HEADER_BYTES + 10)
                        + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                        (414, 431, 400))


def test_oversized_head_never_terminated(gate):
    """A head that never ends must be cut at max_header_bytes, not buffered
    until the client timeout."""
    check_rejected(gate, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: "
                         + b"a" * (MAX_HEADER_BYTES * 4), (431, 400))


def test_too_many_headers(gate, proto):
    hdrs = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + hdrs + b"\r\n"
    assert len(data) < MAX_HEADER_BYTES
    check_rejected_over(proto, gate, data, (431, 400))


def test_garbage_bytes(gate):
    check_rejected(gate, b"\x00\x01\x02\xff\xfe\x16\x03\x01 garbage\r\n\r\n")


def test_tls_client_hello_on_plain_port(gate):
    """0x16 can never start a method token: rejected at once, not after the
    client timeout (60 s by default, far beyond this test's 5 s)."""
    hello = bytes.fromhex("160301002e0100002a0303") + b"\x00" * 32 + \
        b"\x00\x00\x02\x00\x2f\x01\x00"
    out, closed = raw_closed(gate.port, hello, timeout=5)
    assert closed
    assert out == b"" or out.startswith(b"HTTP/1.1 400"), out
    assert gate.upstream.stats()["total"] == 0


def test_nul_in_header_value(gate, proto):
    check_rejected_over(proto, gate, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n")


def test_chunked_bad_size(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         b"zz\r\nhello\r\n0\r\n\r\n")


def test_chunked_size_overflow(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         b"ffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
                   (400, 413))


def test_chunked_missing_crlf_after_data(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhelloXX0\r\n\r\n")


def test_unknown_transfer_coding(gate):
    """An unknown coding under a final chunked: 501 (RFC 9112 section 6.1)."""
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: gzip2, chunked\r\n\r\n"
                         b"0\r\n\r\n", (501,))


def test_transfer_coding_without_chunked(gate):
    """A request whose final coding is not chunked has no knowable length:
    400 (RFC 9112 section 6.3); 501 is tolerated for an unknown coding."""
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: gzip2\r\n\r\n", (400, 501))


def test_transfer_coding_chunked_not_last(gate):
    check_rejected(gate, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked, identity\r\n\r\n"
                         b"0\r\n\r\n", (400, 501))


def test_bad_http_version(gate):
    check_rejected(gate, b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", (505,))


def test_malformed_http_version(gate):
    check_rejected(gate, b"GET /echo HTTX/1.1\r\nHost: x\r\n\r\n")


def test_missing_http_version(gate):
    check_rejected(gate, b"GET /echo\r\nHost: x\r\n\r\n")


# -- pipelining ------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(gate):
    data = (b"GET /echo?i=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo?i=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo?i=4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = raw(gate.port, data, timeout=10)
    rs = parse_responses(out)
    assert [r.status for r in rs] == [200, 200, 200, 200], out[:1000]
    assert rs[0].json()["path"] == "/echo?i=1"
    assert rs[1].json()["path"] == "/echo?i=2"
    assert rs[1].json()["body"] == "abc"
    assert rs[2].json()["slow"] is True
    assert rs[3].json()["path"] == "/echo?i=4"


def test_pipelined_slow_first_keeps_order(gate):
    data = (b"GET /slow?ms=500 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo?i=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = raw(gate.port, data, timeout=10)
    rs = parse_responses(out)
    assert len(rs) == 2, out
    assert rs[0].json().get("slow") is True
    assert rs[1].json()["path"] == "/echo?i=2"


def test_pipelined_malformed_after_good(gate):
    """The good request is answered; the malformed one after it gets a 400,
    the connection is closed, and only the good one reached the upstream."""
    data = (b"GET /echo?i=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo?i=2 HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n")
    out, closed = raw_closed(gate.port, data, timeout=5)
    rs = parse_responses(out)
    assert [r.status for r in rs] == [200, 400], out[:800]
    assert closed
    assert gate.upstream.stats()["total"] == 1
