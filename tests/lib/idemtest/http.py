"""HTTP as the tests speak it: the one response type and every way to send.

Owns: Resp (status, reason, headers in order, body); request() (one request
with full header control: a dict or a list of pairs, repeats and bytes
values allowed, on a fresh connection or a given one, plain or TLS), post()
and hdrs() for covered requests, post_bytes() for the same request as raw
bytes; Client (one keep-alive connection); raw() / raw_closed() /
recv_until_closed() / recv_to_close() for raw sockets; split_head(),
dechunk(), parse_responses() and read_response() to take raw response bytes
apart; metrics() (the admin /metrics text as a dict).
"""

import http.client
import json
import socket
import time

BODY = b'{"amount": 100}'


def header_value(headers, name):
    """The first value of header name (any case) in a list of pairs, or
    None."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


class Resp:
    """One HTTP response: status, reason, headers (list of (name, value) in
    order) and body bytes (de-chunked)."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = list(headers)
        self.body = body

    def header(self, name):
        return header_value(self.headers, name)

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    @property
    def replayed(self):
        return self.header("Idempotent-Replayed") == "true"

    def __repr__(self):
        return "Resp(%d %s, headers=%r, body=%r)" % (
            self.status, self.reason, self.headers, self.body[:300])


# -- requests through http.client --------------------------------------------


def header_items(headers):
    """headers (None, a dict or a list of pairs) as a list of pairs."""
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def _send(conn, method, path, headers, body):
    items = header_items(headers)
    names = {k.lower() for k, _ in items}
    conn.putrequest(method, path, skip_host="host" in names,
                    skip_accept_encoding=True)
    for k, v in items:
        conn.putheader(k, v)
    if ("content-length" not in names and "transfer-encoding" not in names
            and (body or method in ("POST", "PUT", "PATCH"))):
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    if body:
        conn.send(body)


def _read(conn):
    r = conn.getresponse()
    body = r.read()
    return Resp(r.status, r.reason, r.getheaders(), body), r


def connection(port, timeout=15, host="127.0.0.1", context=None):
    """An http.client connection (HTTPS when context, an ssl.SSLContext, is
    given); nothing is sent yet."""
    if context is not None:
        return http.client.HTTPSConnection(host, port, timeout=timeout,
                                           context=context)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def request(port, method, path, headers=None, body=b"", timeout=15,
            host="127.0.0.1", conn=None, context=None):
    """Sends one request with exactly the given headers (a dict or a list
    of (name, value) pairs; values may be bytes; repeats allowed), plus Host
    unless given and Content-Length for a body (or a POST, PUT, PATCH)
    unless Content-Length or Transfer-Encoding is given. Uses a fresh
    connection (TLS with context) unless conn (an http.client connection)
    is given. Returns the Resp."""
    if isinstance(body, str):
        body = body.encode()
    own = conn is None
    if own:
        conn = connection(port, timeout, host, context)
    try:
        _send(conn, method, path, headers, body)
        resp, _ = _read(conn)
        return resp
    finally:
        if own:
            conn.close()


def hdrs(key=None, api_key="k1", ctype="application/json", extra=None):
    """Request headers for a covered request, as a list of pairs. key None:
    no Idempotency-Key; api_key None: no Authorization; ctype None: no
    Content-Type; extra: more pairs (or a dict) after those."""
    h = []
    if key is not None:
        h.append(("Idempotency-Key", key))
    if api_key is not None:
        h.append(("Authorization", "Bearer " + api_key))
    if ctype is not None:
        h.append(("Content-Type", ctype))
    if extra:
        h.extend(header_items(extra))
    return h


def post(port, path, key, body=BODY, api_key="k1", method="POST", extra=None,
         ctype="application/json", timeout=15):
    """A covered request (hdrs()) on a fresh connection."""
    return request(port, method, path, hdrs(key, api_key, ctype, extra), body,
                   timeout=timeout)


def post_bytes(path, key, body=BODY, api_key="k1", host="127.0.0.1"):
    """The covered POST as raw bytes: (head, body)."""
    head = ("POST %s HTTP/1.1\r\nHost: %s\r\nIdempotency-Key: %s\r\n"
            "Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (path, host, key, api_key, len(body)))
    return head.encode(), body


class Client:
    """One keep-alive client connection (TLS with context) for several
    requests. .reconnects counts how often http.client had to open a new
    connection after the first (0 means every request used the same
    connection)."""

    def __init__(self, port, timeout=10, host="127.0.0.1", context=None):
        self.conn = connection(port, timeout, host, context)
        self.requests = 0
        self.reconnects = 0
        self.last_will_close = False

    def request(self, method, path, headers=None, body=b""):
        if isinstance(body, str):
            body = body.encode()
        if self.requests and self.conn.sock is None:
            self.reconnects += 1
        self.requests += 1
        _send(self.conn, method, path, headers, body)
        resp, r = _read(self.conn)
        self.last_will_close = r.will_close
        return resp

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- raw sockets ---------------------------------------------------------------


def recv_until_closed(s, timeout):
    """Reads from socket s until the peer closes (or resets) or timeout
    seconds have passed in total. Returns (bytes read, closed): closed is
    False when the connection was still open at the deadline."""
    deadline = time.monotonic() + timeout
    out = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out, False
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return out, False
        except OSError:
            return out, True
        if not chunk:
            return out, True
        out += chunk


def raw_closed(port, data, timeout=5, host="127.0.0.1"):
    """Sends raw bytes on a new connection and reads until the peer closes
    or timeout seconds have passed in total. Returns (bytes read, closed):
    whether the peer closed the connection (True) or it was still open at
    the timeout (False)."""
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(data)
        return recv_until_closed(s, timeout)
    finally:
        s.close()


def raw(port, data, timeout=5, host="127.0.0.1"):
    """raw_closed() without the closed flag: the bytes read."""
    return raw_closed(port, data, timeout, host)[0]


def recv_to_close(s, timeout=10):
    """Reads from socket s until the peer closes or timeout seconds have
    passed in total; a read that stalls past the deadline raises
    socket.timeout. Returns the bytes read."""
    deadline = time.monotonic() + timeout
    out = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


# -- raw response bytes ------------------------------------------------------


def split_head(data):
    """Split raw response bytes into (Resp with empty body, rest) once the
    head is complete, else (None, data)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None, data
    lines = data[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return (Resp(int(parts[1]), parts[2] if len(parts) > 2 else "", headers,
                 b""), data[end + 4:])


def dechunk(data):
    """Decodes as much of a chunked body as is complete in data (the bytes
    after the response head). Returns (body so far, finished, rest): rest is
    what follows the last chunk and its trailers once finished."""
    body = b""
    while True:
        le = data.find(b"\r\n")
        if le < 0:
            return body, False, b""
        try:
            size = int(data[:le].split(b";")[0], 16)
        except ValueError:
            return body, False, b""
        if size == 0:
            data = data[le + 2:]
            while True:  # trailers, up to the empty line
                te = data.find(b"\r\n")
                if te < 0:
                    return body, True, b""
                data = data[te + 2:]
                if te == 0:
                    return body, True, data
        if len(data) < le + 2 + size + 2:
            return body, False, b""
        body += data[le + 2:le + 2 + size]
        data = data[le + 2 + size + 2:]


def _no_body(resp, head_request=False):
    return head_request or resp.status in (204, 304) or 100 <= resp.status < 200


def _chunked(resp):
    return "chunked" in (resp.header("Transfer-Encoding") or "").lower()


def parse_responses(data, head_request=False):
    """Parse raw HTTP/1.x responses (as received by raw()) into a list of
    Resp. Handles Content-Length, chunked, and read-until-close bodies."""
    out = []
    while data:
        r, data = split_head(data)
        if r is None:
            break
        cl = r.header("Content-Length")
        if _no_body(r, head_request):
            body = b""
        elif _chunked(r):
            body, _, data = dechunk(data)
        elif cl is not None:
            n = int(cl)
            body, data = data[:n], data[n:]
        else:
            body, data = data, b""
        r.body = body
        out.append(r)
    return out


def _framing_done(resp, data):
    """(finished, body) for the bytes after a head."""
    if _no_body(resp):
        return True, b""
    if _chunked(resp):
        body, finished, _ = dechunk(data)
        return finished, body
    cl = resp.header("Content-Length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            return False, data
        return len(data) >= n, data[:n]
    return False, data  # ends at close


def read_request(sock, buf):
    """One request with a Content-Length body from a test upstream's socket
    (buf: bytes already read). Returns ((method, target, headers), rest),
    headers a dict with lower-case names; (None, buf) when the peer closed
    first."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    n = int(hdrs.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        rest += chunk
    return (method, target, hdrs), rest[n:]


def read_response(sock, deadline):
    """Reads one response from sock until deadline (time.monotonic()).
    Returns (kind, Resp or None, body): kind "answer" (complete), "cut" (a
    head, then the connection ended inside the body), "timeout" or
    "disconnect" (closed before a head)."""
    data = b""
    resp = None
    while True:
        if resp is None:
            resp, rest = split_head(data)
            if resp is not None:
                data = rest
        if resp is not None:
            done, body = _framing_done(resp, data)
            if done:
                return "answer", resp, body
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", resp, data
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return "timeout", resp, data
        except OSError:
            chunk = b""
        if not chunk:
            if resp is None:
                return "disconnect", None, b""
            if resp.header("Content-Length") is None and not _chunked(resp):
                return "answer", resp, data  # close-delimited
            return "cut", resp, _framing_done(resp, data)[1]
        data += chunk


# -- the admin listener ------------------------------------------------------


def metrics(admin_port):
    """/metrics of the admin listener on admin_port as {sample: value}
    (a sample is the name with its labels, as written); checks the answer
    is 200 text/plain."""
    r = request(admin_port, "GET", "/metrics")
    assert r.status == 200, r
    assert (r.header("Content-Type") or "").startswith("text/plain"), r
    values = {}
    for line in r.body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values
