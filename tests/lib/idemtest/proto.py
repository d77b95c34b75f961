"""One request over the protocol a test runs on: HTTP/1.1 (http.py) or
HTTP/2 with prior knowledge (h2.py), answered as the same http.Resp, so a
test written for HTTP/1.1 runs over both by taking the `proto` fixture
(fixtures.py) and calling proto.post() / proto.request() where it called
post() / request().

Owns: PROTOS ("h1", "h2"); Proto (request(), post(), client() for several
requests on one connection, send() for a request the client then walks
away from); refused() (a request refused as malformed: 400 bad_request,
or over HTTP/2 also the stream reset with PROTOCOL_ERROR, as RFC 9113
section 8.1.1 allows).

What differs, and stays visible to the tests: over HTTP/2 header names are
lowercase (Resp.header() ignores case), there is no reason phrase, and a
Host header becomes :authority (there is no other Host in HTTP/2).
"""

import socket

from . import h2 as ih2
from . import http as ihttp
from .http import BODY, hdrs, header_items

PROTOS = ("h1", "h2")


def _h2_split_host(headers):
    """(authority or None, the other headers): a Host header is HTTP/2's
    :authority."""
    authority, rest = None, []
    for k, v in header_items(headers):
        name = k.decode("latin-1") if isinstance(k, bytes) else k
        if name.lower() == "host" and authority is None:
            authority = v.decode("latin-1") if isinstance(v, bytes) else v
        else:
            rest.append((k, v))
    return authority, rest


def _h2_answer(c, sid, allow_reset):
    """The stream's answer; with allow_reset, a stream the server reset is
    an http.Resp with status 0 and reset_code set (else AssertionError)."""
    if not allow_reset:
        return c.response(sid)
    st = c.wait_stream(sid)
    if st.reset_code is not None:
        r = st.resp()
        r.status = 0
        r.reset_code = st.reset_code
        return r
    return c.response(sid)


class H2Conn:
    """One HTTP/2 connection used like http.Client: request() opens a
    stream and waits for its answer."""

    def __init__(self, port, timeout=10):
        self.c = ih2.H2Client(port, timeout=timeout)

    def request(self, method, path, headers=None, body=b"", allow_reset=False):
        authority, rest = _h2_split_host(headers)
        sid = self.c.request(method, path, rest, body, authority=authority)
        return _h2_answer(self.c, sid, allow_reset)

    def close(self):
        self.c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Proto:
    """Requests over one protocol: name "h1" (http.request) or "h2" (a
    fresh h2c connection per request unless client() is used)."""

    def __init__(self, name):
        assert name in PROTOS, name
        self.name = name

    @property
    def h2(self):
        return self.name == "h2"

    def request(self, port, method, path, headers=None, body=b"", timeout=15,
                allow_reset=False):
        """http.request() over this protocol. allow_reset (HTTP/2): a stream
        the server reset comes back as a Resp with status 0 and its
        reset_code instead of failing."""
        if not self.h2:
            return ihttp.request(port, method, path, headers, body, timeout=timeout)
        with H2Conn(port, timeout) as c:
            return c.request(method, path, headers, body, allow_reset=allow_reset)

    def post(self, port, path, key, body=BODY, api_key="k1", method="POST",
             extra=None, ctype="application/json", timeout=15):
        """http.post() over this protocol: a covered request (http.hdrs())
        on a fresh connection."""
        return self.request(port, method, path, hdrs(key, api_key, ctype, extra),
                            body, timeout=timeout)

    def client(self, port, timeout=10):
        """One connection for several requests (.request(method, path,
        headers, body), .close()): an http.Client (keep-alive), or an
        H2Conn (a stream per request)."""
        if self.h2:
            return H2Conn(port, timeout)
        return ihttp.Client(port, timeout)

    def send(self, port, path, key, body=BODY):
        """Sends a covered POST and reads nothing: returns what to close()
        for a client that walks away (a raw socket, or the HTTP/2
        connection with its stream open)."""
        if self.h2:
            c = ih2.H2Client(port, timeout=5)
            c.post(path, key, body)
            return c
        s = socket.create_connection(("127.0.0.1", port), 5)
        s.sendall(b"".join(ihttp.post_bytes(path, key, body)))
        return s

    def __repr__(self):
        return self.name


def refused(r):
    """Whether r is a request refused as malformed: 400 bad_request, or a
    stream reset with PROTOCOL_ERROR (Proto.request(allow_reset=True))."""
    if getattr(r, "reset_code", None) is not None:
        return r.reset_code == ih2.PROTOCOL_ERROR
    return r.status == 400 and b"bad_request" in r.body
