#!/usr/bin/env python3
"""demo_upstream.py — the small payments-like JSON API that `make run` puts
behind idemgate (Python 3 standard library only). It is not idempotent by
itself: every POST /v1/charges creates a new charge, which is what makes
idemgate's work visible.

  POST /v1/charges        {"amount": 4200, "currency": "eur", "description": "..."}
                          -> 201 the new charge {"id": "ch_...", "amount", ...};
                          400 invalid_request when the body is not such JSON.
                          The header X-Charges-Created says how many charges
                          this server has created so far.
  GET  /v1/charges        every charge, newest first
  GET  /v1/charges/<id>   one charge, or 404
  POST /v1/slow           sleeps ?ms=N milliseconds (default 2000), then 200
                          (try a retry while it runs: 409 request_in_progress)
  GET  /v1/events         text/event-stream: ?n=N events (default 5) 500 ms
                          apart, streamed through idemgate unbuffered
  GET  /healthz           200

Usage: demo_upstream.py [--host 127.0.0.1] [--port 9000] [--quiet]
"""

import argparse
import json
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
CHARGES = {}  # id -> charge, in creation order
MAX_BODY = 1 << 20


def new_charge(req):
    """A charge from a parsed request body, or an error message."""
    if not isinstance(req, dict):
        return None, "the body must be a JSON object"
    amount = req.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        return None, "amount must be a positive integer (in cents)"
    currency = req.get("currency", "eur")
    if not isinstance(currency, str) or len(currency) != 3:
        return None, "currency must be a three-letter code"
    description = req.get("description")
    if description is not None and not isinstance(description, str):
        return None, "description must be a string"
    with LOCK:
        charge = {
            "id": "ch_" + secrets.token_hex(8),
            "object": "charge",
            "amount": amount,
            "currency": currency.lower(),
            "description": description,
            "status": "succeeded",
            "created": int(time.time()),
        }
        CHARGES[charge["id"]] = charge
        return charge, len(CHARGES)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-payments/1.0"
    quiet = False

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002 - base signature
        if not self.quiet:
            sys.stderr.write("demo-upstream: %s\n" % (format % args))

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n < 0 or n > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""

    def send_json(self, status, obj, headers=()):
        body = (json.dumps(obj, indent=2) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status, code, message):
        self.send_json(status, {"error": {"code": code, "message": message}})

    def do_GET(self):  # noqa: N802 - http.server naming
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/healthz":
            return self.send_json(200, {"ok": True})
        if path == "/v1/charges":
            with LOCK:
                data = list(reversed(list(CHARGES.values())))
            return self.send_json(200, {"object": "list", "data": data})
        if path.startswith("/v1/charges/"):
            with LOCK:
                charge = CHARGES.get(path[len("/v1/charges/"):])
            if charge is None:
                return self.send_error_json(404, "not_found", "no such charge")
            return self.send_json(200, charge)
        if path == "/v1/events":
            return self.events(int(query.get("n", ["5"])[0]))
        return self.send_error_json(404, "not_found", "no such endpoint")

    def do_POST(self):  # noqa: N802 - http.server naming
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        try:
            body = self.read_body()
        except ValueError as e:
            self.close_connection = True
            return self.send_error_json(413, "payload_too_large", str(e))
        if path == "/v1/charges":
            try:
                req = json.loads(body or b"null")
            except ValueError:
                return self.send_error_json(400, "invalid_request",
                                            "the body is not valid JSON")
            charge, n = new_charge(req)
            if charge is None:
                return self.send_error_json(400, "invalid_request", n)
            return self.send_json(201, charge, [
                ("Location", "/v1/charges/" + charge["id"]),
                ("X-Charges-Created", str(n))])
        if path == "/v1/slow":
            ms = int(query.get("ms", ["2000"])[0])
            time.sleep(max(0, min(ms, 60000)) / 1000.0)
            return self.send_json(200, {"slow": True, "slept_ms": ms})
        return self.send_error_json(404, "not_found", "no such endpoint")

    def events(self, n):
        """Server-sent events, chunked, one chunk per event."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(max(0, min(n, 100))):
                event = ("id: %d\nevent: tick\ndata: {\"n\": %d, \"time\": %d}\n\n"
                         % (i + 1, i + 1, int(time.time()))).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if i + 1 < n:
                    time.sleep(0.5)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--quiet", action="store_true", help="no access log")
    args = ap.parse_args()
    Handler.quiet = args.quiet
    srv = Server((args.host, args.port), Handler)
    sys.stderr.write("demo-upstream: listening on http://%s:%d\n"
                     % (args.host, args.port))
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
