#!/usr/bin/python3
"""execup.py — the fault suite's upstream: it logs every execution.

Run as its own process:
  /usr/bin/python3 execup.py --log FILE --port P [--port P2 ...]
One listener per --port (give each idemgate instance its own port and the
log says which instance forwarded a request). HTTP/1.1 keep-alive, one
thread per connection, written on raw sockets so that it can misbehave.

Every request to a path not starting with /__ is an *execution*: before
answering, one JSON line is appended to the log (O_APPEND, one write(2) per
line, so a SIGKILL loses nothing written):
  {"ev": "exec", "t": wall time, "key": Idempotency-Key or "-",
   "exec": unique id (pid, counter, random), "port": listener port,
   "path": path, "body": the body it will send (latin-1),
   "mode": how it answers (ok, cut, badcl, badte, s600, drip)}
and for /drip, once the head and half the body are out:
  {"ev": "head", "t": ..., "exec": id}

Paths (the answer's body is JSON {"exec": id, "key": key}, header X-Exec: id):
  /pay?ms=N    201 after N ms (plus the global slow_ms); with the global
               cut_ratio, that fraction of answers is cut like /cut.
  /cut         201 head with Content-Length 64 more than it sends, then close.
  /badcl       201 with "Content-Length: 2, 2", then close.
  /badte       201 with "Transfer-Encoding: gzip" (no chunked), body, close.
  /s600        status 600, then close.
  /drip        201 head and half the body, then (while the global drip is on)
               waits up to 60 s before the rest: kill the process meanwhile.
  GET /__mode?slow_ms=N&cut_ratio=F&drip=0|1   sets the global mode.
  GET /__ping  200, not logged.
"""

import argparse
import json
import os
import random
import socket
import socketserver
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
MODE = {"slow_ms": 0, "cut_ratio": 0.0, "drip": True}
STATE = {"fd": -1, "n": 0, "prefix": ""}
DRIP_MAX_S = 60.0


def log_line(obj):
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    os.write(STATE["fd"], data)


def new_exec_id():
    with LOCK:
        STATE["n"] += 1
        return "%s-%d" % (STATE["prefix"], STATE["n"])


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        try:
            while self.one(sock, rfile):
                pass
        except (OSError, ValueError):
            pass
        finally:
            try:
                rfile.close()
            except OSError:
                pass

    def one(self, sock, rfile):
        """Serves one request; returns False when the connection is done."""
        line = rfile.readline(65537)
        if not line:
            return False
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            return False
        method, target = parts[0], parts[1]
        headers = {}
        while True:
            h = rfile.readline(65537)
            if not h:
                return False
            if h in (b"\r\n", b"\n"):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = read_body(rfile, headers)
        if body is None:
            return False
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/__"):
            return control(sock, method, url.path, query)
        key = headers.get("idempotency-key", "-")
        return execute(sock, url.path, query, key, self.server.server_address[1])


def read_body(rfile, headers):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = b""
        while True:
            size_line = rfile.readline(1024)
            if not size_line:
                return None
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += rfile.read(size)
            rfile.readline(16)
    n = int(headers.get("content-length") or 0)
    data = rfile.read(n) if n else b""
    return data if len(data) == n else None


def control(sock, method, path, query):
    if path == "/__mode" and method == "GET":
        with LOCK:
            if "slow_ms" in query:
                MODE["slow_ms"] = int(query["slow_ms"])
            if "cut_ratio" in query:
                MODE["cut_ratio"] = float(query["cut_ratio"])
            if "drip" in query:
                MODE["drip"] = query["drip"] != "0"
            body = json.dumps(MODE).encode()
    else:
        body = b'{"ok": true}'
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return True


def head(status, reason, exec_id, extra):
    return ("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nX-Exec: %s\r\n%s\r\n"
            % (status, reason, exec_id, "".join(h + "\r\n" for h in extra))).encode()


def execute(sock, path, query, key, port):
    """Logs one execution, then answers as the path says. Returns whether
    the connection stays open."""
    exec_id = new_exec_id()
    body = json.dumps({"exec": exec_id, "key": key}).encode()
    with LOCK:
        slow_ms, cut_ratio = MODE["slow_ms"], MODE["cut_ratio"]
    mode = {"/cut": "cut", "/badcl": "badcl", "/badte": "badte",
            "/s600": "s600", "/drip": "drip"}.get(path, "ok")
    if mode == "ok" and cut_ratio > 0 and random.random() < cut_ratio:
        mode = "cut"
    log_line({"ev": "exec", "t": time.time(), "key": key, "exec": exec_id,
              "port": port, "path": path, "body": body.decode("latin-1"),
              "mode": mode})
    delay = int(query.get("ms", "0")) + (slow_ms if path == "/pay" else 0)
    if delay > 0:
        time.sleep(delay / 1000.0)
    if mode == "ok":
        sock.sendall(head(201, "Created", exec_id, ["Content-Length: %d" % len(body)]) + body)
        return True
    if mode == "cut":
        sock.sendall(head(201, "Created", exec_id, ["Content-Length: %d" % (len(body) + 64)])
                     + body)
    elif mode == "badcl":
        sock.sendall(head(201, "Created", exec_id, ["Content-Length: 2, 2"]) + b"{}")
    elif mode == "badte":
        sock.sendall(head(201, "Created", exec_id, ["Transfer-Encoding: gzip"]) + body)
    elif mode == "s600":
        sock.sendall(head(600, "Odd", exec_id, ["Content-Length: %d" % len(body)]) + body)
    elif mode == "drip":
        return drip(sock, exec_id, body)
    sock.shutdown(socket.SHUT_RDWR)
    return False


def drip(sock, exec_id, body):
    half = len(body) // 2
    sock.sendall(head(201, "Created", exec_id, ["Content-Length: %d" % len(body)]) + body[:half])
    log_line({"ev": "head", "t": time.time(), "exec": exec_id})
    deadline = time.monotonic() + DRIP_MAX_S
    while time.monotonic() < deadline:
        with LOCK:
            if not MODE["drip"]:
                break
        time.sleep(0.05)
    sock.sendall(body[half:])
    return True


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--no-drip", action="store_true",
                    help="start with the /drip pause off")
    args = ap.parse_args()
    STATE["fd"] = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    STATE["prefix"] = "%d.%04x" % (os.getpid(), random.getrandbits(16))
    MODE["drip"] = not args.no_drip
    servers = [Server(("127.0.0.1", p), Handler) for p in args.port]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()
    sys.stdout.write("listening %s\n" % " ".join(map(str, args.port)))
    sys.stdout.flush()
    try:
        servers[0].serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
