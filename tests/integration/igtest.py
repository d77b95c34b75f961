"""Helpers shared by the idemgate integration tests.

Owns: process wrappers (upstream.py, redis-server, idemgate), a small HTTP
client (fresh connection, keep-alive connection, raw bytes), and response
parsing. Fixtures that use these live in conftest.py.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# Environment variables idemgate reads; scrubbed from the inherited
# environment so a developer's shell cannot change what a test sees.
IDEMGATE_ENV = ("IDEMGATE_LISTEN", "IDEMGATE_UPSTREAM", "IDEMGATE_STORE",
                "IDEMGATE_REDIS_URL", "IDEMGATE_WORKERS",
                "IDEMGATE_ADMIN_LISTEN", "IDEMGATE_SCOPE_SECRET",
                "IDEMGATE_LOG_LEVEL", "IDEMPOTENCY_TTL_SECONDS")


def idemgate_bin():
    env = os.environ.get("IDEMGATE_BIN")
    if env:
        return env
    return os.path.normpath(os.path.join(HERE, "..", "..", "build", "idemgate"))


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def port_open(port, host="127.0.0.1", timeout=0.2):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port, timeout=10.0, proc=None, host="127.0.0.1"):
    """Wait until port accepts. Returns True, or False on timeout or when
    proc (a Popen) exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if port_open(port, host):
            return True
        time.sleep(0.05)
    return False


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in IDEMGATE_ENV}
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


# -- HTTP -----------------------------------------------------------------


class Resp:
    """One HTTP response: status, reason, headers (list of (name, value) in
    order) and body bytes."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = list(headers)
        self.body = body

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    @property
    def replayed(self):
        return self.header("Idempotent-Replayed") == "true"

    def __repr__(self):
        return "Resp(%d %s, %r, %r)" % (self.status, self.reason,
                                        self.headers, self.body[:200])


def _header_items(headers):
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def _send(conn, method, path, headers, body):
    items = _header_items(headers)
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


def _read(conn, method):
    r = conn.getresponse()
    body = r.read()
    return Resp(r.status, r.reason, r.getheaders(), body), r


def request(port, method, path, headers=None, body=b"", timeout=10,
            host="127.0.0.1"):
    """One request on a fresh connection. headers: dict or list of pairs
    (a list may repeat a name). Content-Length is added for a body unless
    Content-Length or Transfer-Encoding is given."""
    if isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        _send(conn, method, path, headers, body)
        resp, _ = _read(conn, method)
        return resp
    finally:
        conn.close()


class Client:
    """One keep-alive client connection for several requests.
    .reconnects counts how often http.client had to open a new connection
    after the first (0 means every request used the same connection)."""

    def __init__(self, port, timeout=10, host="127.0.0.1"):
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
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
        resp, r = _read(self.conn, method)
        self.last_will_close = r.will_close
        return resp

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def raw(port, data, timeout=5, host="127.0.0.1"):
    """Send raw bytes and read until the peer closes or timeout seconds have
    passed in total. Returns the bytes read."""
    deadline = time.monotonic() + timeout
    s = socket.create_connection((host, port), timeout=timeout)
    out = b""
    try:
        s.sendall(data)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out


def raw_closed(port, data, timeout=5, host="127.0.0.1"):
    """Like raw() but also says whether the peer closed the connection
    (True) or it was still open at the timeout (False)."""
    deadline = time.monotonic() + timeout
    s = socket.create_connection((host, port), timeout=timeout)
    out = b""
    closed = False
    try:
        s.sendall(data)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            out += chunk
    finally:
        s.close()
    return out, closed


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


def parse_responses(data, head_request=False):
    """Parse raw HTTP/1.x responses (as received by raw()) into a list of
    Resp. Handles Content-Length, chunked, and read-until-close bodies."""
    out = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head = data[:end].decode("latin-1").split("\r\n")
        data = data[end + 4:]
        parts = head[0].split(" ", 2)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = []
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        r = Resp(status, reason, headers, b"")
        te = (r.header("Transfer-Encoding") or "").lower()
        cl = r.header("Content-Length")
        if head_request or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in te:
            body = b""
            while True:
                le = data.find(b"\r\n")
                if le < 0:
                    data = b""
                    break
                size = int(data[:le].split(b";")[0], 16)
                data = data[le + 2:]
                if size == 0:
                    te_end = data.find(b"\r\n")
                    while te_end > 0:  # skip trailers
                        data = data[te_end + 2:]
                        te_end = data.find(b"\r\n")
                    data = data[2:] if te_end == 0 else b""
                    break
                body += data[:size]
                data = data[size + 2:]
        elif cl is not None:
            n = int(cl)
            body, data = data[:n], data[n:]
        else:
            body, data = data, b""
        r.body = body
        out.append(r)
    return out


def idem_headers(key, api_key="k1"):
    return {"Idempotency-Key": key, "Authorization": "Bearer " + api_key,
            "Content-Type": "application/json"}


# -- processes ------------------------------------------------------------


def _stop_proc(proc, sig=signal.SIGTERM, timeout=15):
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        return proc.returncode


class Upstream:
    """upstream.py in its own process."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(HERE, "upstream.py"), "--port",
             str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port, 10, self.proc):
            self.stop()
            raise RuntimeError("upstream.py did not start on %d" % self.port)

    def stats(self):
        return request(self.port, "GET", "/__stats").json()

    def count(self, key):
        return self.stats()["by_key"].get(key, 0)

    def reset(self):
        request(self.port, "POST", "/__reset")

    def stop(self):
        if self.proc is not None:
            _stop_proc(self.proc, signal.SIGTERM, 5)


class Redis:
    """A private redis-server on a free port."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.proc = None
        self.start()

    def start(self):
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if self.cli("PING") == "PONG":
                    return
            except Exception:  # noqa: BLE001 - retry until the deadline
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start on %d" % self.port)

    def cli(self, *args):
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port)] + [str(a) for a in args],
            capture_output=True, timeout=10, check=False)
        return out.stdout.decode().strip()

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def restart(self):
        self.kill()
        self.start()

    def stop(self):
        if self.proc is not None:
            _stop_proc(self.proc, signal.SIGTERM, 5)


def run_idemgate(args, env=None, timeout=20):
    """Run idemgate to completion (for -t, --version, bad configs).
    Returns subprocess.CompletedProcess with text stdout/stderr."""
    return subprocess.run([idemgate_bin()] + list(args), env=clean_env(env),
                          capture_output=True, timeout=timeout, text=True,
                          check=False)


def _listen_port(listen):
    return int(str(listen).rsplit(":", 1)[1])


class Idemgate:
    """One running idemgate. Built by the conftest `idemgate` factory."""

    def __init__(self, workdir, config=None, args=(), env=None, wait=True,
                 base=True):
        cfg = {}
        if base:
            cfg = {"listen": "127.0.0.1:%d" % free_port(), "workers": 1,
                   "admin": {"listen": "off"}}
        cfg.update(config or {})
        self.config = cfg
        fd, self.config_path = tempfile.mkstemp(prefix="idemgate-",
                                                suffix=".json", dir=workdir)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f, indent=2)
        fd, self.stderr_path = tempfile.mkstemp(prefix="idemgate-",
                                                suffix=".log", dir=workdir)
        os.close(fd)
        self.args = ["-c", self.config_path] + list(args)
        self.env = dict(env or {})
        self.port = self._pick_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([idemgate_bin()] + self.args,
                                     env=clean_env(self.env),
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=self._err)
        if wait:
            self.wait_ready()

    def _pick_port(self):
        args = list(self.args)
        for i, a in enumerate(args):
            if a == "--listen" and i + 1 < len(args):
                return _listen_port(args[i + 1])
            if a.startswith("--listen="):
                return _listen_port(a.split("=", 1)[1])
        if "IDEMGATE_LISTEN" in self.env:
            return _listen_port(self.env["IDEMGATE_LISTEN"])
        if "listen" in self.config:
            return _listen_port(self.config["listen"])
        return 8080

    def wait_ready(self, timeout=10):
        """Wait until the listen port accepts; raise with the stderr text
        when the process exits first or the deadline passes."""
        if wait_port(self.port, timeout, self.proc):
            return
        code = self.proc.poll()
        raise RuntimeError("idemgate not listening on %d (exit %r); stderr:\n%s"
                           % (self.port, code, self.stderr()))

    def stderr(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_lines(self):
        """Parsed JSON objects from stderr; lines that are not JSON are
        returned as {"_raw": line}."""
        out = []
        for line in self.stderr().splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"_raw": line})
        return out

    def stop(self, sig=signal.SIGTERM, timeout=15):
        code = _stop_proc(self.proc, sig, timeout)
        try:
            self._err.close()
        except OSError:
            pass
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        return self.proc.returncode

    def alive(self):
        return self.proc.poll() is None


def exit_code(g, timeout=10):
    """Waits for idemgate g (started to fail) to exit; kills it if it has
    not by the deadline (and re-raises the TimeoutExpired). Returns the exit
    code."""
    try:
        return g.proc.wait(timeout=timeout)
    finally:
        g.kill()


def dechunk_partial(data):
    """Decode as much of a chunked body as is complete in data (the bytes
    after the response head). Returns (body_so_far, finished)."""
    body = b""
    while True:
        le = data.find(b"\r\n")
        if le < 0:
            return body, False
        try:
            size = int(data[:le].split(b";")[0], 16)
        except ValueError:
            return body, False
        if size == 0:
            return body, True
        if len(data) < le + 2 + size + 2:
            return body, False
        body += data[le + 2:le + 2 + size]
        data = data[le + 2 + size + 2:]


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
