#!/usr/bin/python3
"""Upstream server for the idemgate integration tests.

Run as its own process: `/usr/bin/python3 upstream.py --port N`
(add `--tls-cert FILE --tls-key FILE` to serve HTTPS instead).
HTTP/1.1 with keep-alive, one daemon thread per connection. Every request
except GET /__stats and POST /__reset is counted (total, by Idempotency-Key,
by path without query), including requests the server could not parse.
Every parsed request but those two is also *in flight* from the moment its
head is read until its answer is written (or the write fails): the stats
report how many are in flight now and the most there ever were at once
(a ?ms=N hold of /count or /slow keeps a request in flight that long).

Endpoints (any method unless noted):
  /echo                 200 JSON {method, path (raw target, with query),
                        headers [[name, value], ...] in received order,
                        body (latin-1 str), body_len, port}
                        plus X-Upstream: echo, Set-Cookie: s=1, X-Custom: abc.
                        Any unknown path answers like /echo.
  /count[?ms=N][&status=NNN]
                        201 (or NNN) JSON {n, key}, header X-Exec: n.
  /status/NNN           NNN with a small JSON body.
  /slow?ms=N            sleeps N ms, 200.
  /sse?n=N&gap_ms=M     text/event-stream, hand-written chunked framing,
                        N events "data: i\\n\\n", M ms apart.
  /big?bytes=N          N deterministic bytes with Content-Length.
  /bigchunked?bytes=N   same body, chunked, chunks of 8191 bytes.
  /upload               JSON {len, sha256} of the request body.
  /drop                 closes the connection without an answer.
  /headers?set=Name:Value&set=...
                        200 with those response headers.
  GET /__stats          {by_key, by_path, total, connections, in_flight,
                        max_in_flight}
  POST /__reset         resets the counters (not the connection count);
                        max_in_flight restarts from the requests in flight.
"""

import argparse
import hashlib
import json
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
STATS = {"by_key": {}, "by_path": {}, "total": 0, "connections": 0,
         "in_flight": 0, "max_in_flight": 0}


def big_body(n):
    pattern = bytes(range(256))
    reps = n // 256 + 1
    return (pattern * reps)[:n]


def count(key, path):
    with LOCK:
        STATS["total"] += 1
        STATS["by_key"][key] = STATS["by_key"].get(key, 0) + 1
        STATS["by_path"][path] = STATS["by_path"].get(path, 0) + 1
        return STATS["by_key"][key], STATS["by_path"][path]


def in_flight(delta):
    """One request more (+1) or fewer (-1) in flight; keeps the highest."""
    with LOCK:
        STATS["in_flight"] += delta
        if STATS["in_flight"] > STATS["max_in_flight"]:
            STATS["max_in_flight"] = STATS["in_flight"]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    tls_context = None  # set for HTTPS: the handshake runs in the handler

    def get_request(self):
        conn, addr = super().get_request()
        with LOCK:
            STATS["connections"] += 1
        if self.tls_context is not None:
            conn = self.tls_context.wrap_socket(
                conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "upstream-test"
    timeout = 120

    def log_message(self, format, *args):  # noqa: A002 - base signature
        pass

    def setup(self):
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def parse_request(self):
        ok = super().parse_request()
        if not ok:
            count("-", "<malformed>")
        return ok

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    # -- helpers --------------------------------------------------------

    def read_body(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            return self.read_chunked()
        n = int(self.headers.get("Content-Length") or 0)
        data = b""
        while len(data) < n:
            part = self.rfile.read(n - len(data))
            if not part:
                break
            data += part
        return data

    def read_chunked(self):
        parts = []
        while True:
            line = self.rfile.readline(1024)
            if not line:
                break
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers until the empty line
                    t = self.rfile.readline(8192)
                    if t in (b"\r\n", b"\n", b""):
                        break
                break
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)
        return b"".join(parts)

    def reply(self, status, body=b"", headers=(), ctype="application/json"):
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def reply_json(self, status, obj, headers=()):
        self.reply(status, json.dumps(obj).encode(), headers)

    # -- dispatch -------------------------------------------------------

    def dispatch(self):
        url = urlsplit(self.path)
        path = url.path
        query = parse_qs(url.query)
        try:
            if path == "/__stats" and self.command == "GET":
                self.read_body()
                with LOCK:
                    snap = json.loads(json.dumps(STATS))
                return self.reply_json(200, snap)
            if path == "/__reset" and self.command == "POST":
                self.read_body()
                with LOCK:
                    STATS["by_key"] = {}
                    STATS["by_path"] = {}
                    STATS["total"] = 0
                    STATS["max_in_flight"] = STATS["in_flight"]
                return self.reply_json(200, {"ok": True})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        in_flight(+1)
        try:
            body = self.read_body()
            key = self.headers.get("Idempotency-Key", "-")
            n, _ = count(key, path)
            self.route(path, query, body, key, n)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            in_flight(-1)

    def route(self, path, query, body, key, n):
        def q(name, default):
            return query.get(name, [default])[0]

        if path == "/count":
            time.sleep(int(q("ms", "0")) / 1000.0)
            status = int(q("status", "201"))
            return self.reply_json(status, {"n": n, "key": key},
                                   [("X-Exec", str(n))])
        if path.startswith("/status/"):
            status = int(path[len("/status/"):])
            return self.reply_json(status, {"status": status, "n": n},
                                   [("X-Exec", str(n))])
        if path == "/slow":
            time.sleep(int(q("ms", "1000")) / 1000.0)
            return self.reply_json(200, {"slow": True, "n": n})
        if path == "/sse":
            return self.sse(int(q("n", "5")), int(q("gap_ms", "100")))
        if path == "/big":
            return self.reply(200, big_body(int(q("bytes", "1024"))),
                              ctype="application/octet-stream")
        if path == "/bigchunked":
            return self.chunked(big_body(int(q("bytes", "1024"))))
        if path == "/upload":
            return self.reply_json(200, {
                "len": len(body),
                "sha256": hashlib.sha256(body).hexdigest()})
        if path == "/drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        if path == "/headers":
            hdrs = []
            for item in query.get("set", []):
                name, _, value = item.partition(":")
                hdrs.append((name.strip(), value.strip()))
            return self.reply_json(200, {"headers": hdrs}, hdrs)
        return self.echo(body)

    def echo(self, body):
        obj = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
            "body_len": len(body),
            "port": self.server.server_address[1],
        }
        return self.reply_json(200, obj, [("X-Upstream", "echo"),
                                          ("Set-Cookie", "s=1"),
                                          ("X-Custom", "abc")])

    def sse(self, n, gap_ms):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for i in range(n):
            if i:
                time.sleep(gap_ms / 1000.0)
            data = ("data: %d\n\n" % i).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def chunked(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for off in range(0, len(body), 8191):
            part = body[off:off + 8191]
            self.wfile.write(b"%x\r\n" % len(part) + part + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--tls-cert", default=None)
    ap.add_argument("--tls-key", default=None)
    args = ap.parse_args()
    srv = Server((args.host, args.port), Handler)
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        srv.tls_context = ctx
    sys.stdout.write("listening %d\n" % args.port)
    sys.stdout.flush()
    try:
        srv.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
