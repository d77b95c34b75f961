"""The processes and listeners a test starts, and how to read them.

Owns: where things are (the idemgate binary, the test upstreams, the repo);
free_port() / free_cluster_port() / port_open() / wait_port() /
non_loopback_ipv4(); clean_env()
(the environment without IDEMGATE_* settings); stop_proc(); the test
upstreams as processes (Upstream: tests/integration/upstream.py, plain or
TLS; ExecUpstream: tests/faults/execup.py, the execution log); redis-server
(RedisServer: one server or sentinel; RedisTLSServer: one that speaks
TLS only; RedisServers: the servers of one test, plain or all TLS, with
start_sentinel() and start_cluster()); idemgate (Idemgate: one running
instance, whose -c file write_config() rewrites and check_config() checks
as -t would; run_idemgate(): to completion; exit_code()); RawServer (a listener thread
in this process for upstreams that misbehave on purpose); rss_kib() and
fd_count() from /proc.
"""

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from . import http as ihttp
from . import resp as iresp

LIB = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.normpath(os.path.join(LIB, "..", ".."))
REPO = os.path.normpath(os.path.join(TESTS, ".."))
INTEGRATION = os.path.join(TESTS, "integration")
FAULTS = os.path.join(TESTS, "faults")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# Environment variables idemgate reads; scrubbed from the inherited
# environment so a developer's shell cannot change what a test sees.
IDEMGATE_ENV = ("IDEMGATE_LISTEN", "IDEMGATE_UPSTREAM", "IDEMGATE_STORE",
                "IDEMGATE_REDIS_URL", "IDEMGATE_WORKERS",
                "IDEMGATE_ADMIN_LISTEN", "IDEMGATE_ADMIN_TOKEN",
                "IDEMGATE_SCOPE_SECRET",
                "IDEMGATE_LOG_LEVEL", "IDEMGATE_LMDB_PATH", "IDEMPOTENCY_TTL_SECONDS")


def idemgate_bin():
    env = os.environ.get("IDEMGATE_BIN")
    if env:
        return env
    return os.path.join(REPO, "build", "idemgate")


# -- ports -----------------------------------------------------------------


_handed_out = set()


def _ephemeral_low():
    """The first port the kernel hands out to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port():
    """A port nothing listens on now, never one this process handed out
    before: two asked for in a row (an admin port, then the listen port)
    must differ, and the kernel may offer a just-closed port again.

    Taken below the kernel's ephemeral range when there is room (10,000
    ports under it): a port from that range, free when asked for, could
    become the local port of any outgoing connection (the tests make
    thousands) before the server meant to listen on it binds, and the
    server would then fail to start."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(1000):
        if low >= 11024:
            port = rng.randrange(low - 10000, low)
            if port in _handed_out or not _bindable(port):
                continue
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            finally:
                s.close()
            if port in _handed_out:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no fresh free port in 1000 tries")


def free_cluster_port():
    """A cluster node also listens on port + 10000 (its bus): both must be
    free, so the port must be below 55536."""
    for _ in range(1000):
        p = free_port()
        if p + 10000 > 65535:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port pair for a cluster node")


def have_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def non_loopback_ipv4():
    """An IPv4 address of this host that is not loopback (the source
    address of its default route), or None. A client connecting from it
    to a listener on 0.0.0.0 is a non-loopback peer without leaving the
    host."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


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


def stop_proc(proc, sig=signal.SIGTERM, timeout=15):
    """Sends sig and waits up to timeout, then SIGKILL. Returns the exit
    code."""
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


def kill_proc(proc):
    """SIGKILL and reap, if still running."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def rss_kib(pid, missing=None):
    """VmRSS of pid in KiB; when /proc has none, missing if given, else an
    AssertionError."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    if missing is not None:
        return missing
    raise AssertionError("no VmRSS for pid %d" % pid)


def fd_count(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


# -- the test upstreams ------------------------------------------------------


class Upstream:
    """tests/integration/upstream.py in its own process. args: more
    upstream.py flags (--tls-cert/--tls-key serve HTTPS: give context, the
    ssl.SSLContext the test talks to it with)."""

    def __init__(self, port=None, args=(), context=None):
        self.port = port or free_port()
        self.args = list(args)
        self.context = context
        self.url = "%s://127.0.0.1:%d" % ("https" if context else "http", self.port)
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(INTEGRATION, "upstream.py"), "--port",
             str(self.port)] + self.args,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port, 10, self.proc):
            self.stop()
            raise RuntimeError("upstream.py did not start on %d" % self.port)

    def _get(self, method, path):
        return ihttp.request(self.port, method, path, context=self.context)

    def stats(self):
        return self._get("GET", "/__stats").json()

    def count(self, key):
        return self.stats()["by_key"].get(key, 0)

    def in_flight(self):
        """Requests it is working on now (head read, answer not written)."""
        return self.stats()["in_flight"]

    def max_in_flight(self):
        """The most requests it had in flight at once (since the start or
        the last reset())."""
        return self.stats()["max_in_flight"]

    def reset(self):
        self._get("POST", "/__reset")

    def stop(self):
        if self.proc is not None:
            stop_proc(self.proc, signal.SIGTERM, 5)


class ExecUpstream:
    """tests/faults/execup.py on one port per idemgate instance, logging
    every execution to log_path."""

    def __init__(self, log_path, nports=1, ports=None):
        self.log_path = log_path
        self.ports = list(ports or [free_port() for _ in range(nports)])
        self.urls = ["http://127.0.0.1:%d" % p for p in self.ports]
        self.url = self.urls[0]
        self.port = self.ports[0]
        self.proc = None
        self.start()

    def start(self, drip=True):
        args = [PYTHON, os.path.join(FAULTS, "execup.py"), "--log", self.log_path]
        for p in self.ports:
            args += ["--port", str(p)]
        if not drip:
            args.append("--no-drip")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in self.ports:
            if not wait_port(p, 10, self.proc):
                self.stop()
                raise RuntimeError("execup.py did not start on %d" % p)

    def kill(self):
        kill_proc(self.proc)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_proc(self.proc, signal.SIGTERM, 5)

    def set_mode(self, **kw):
        q = "&".join("%s=%s" % (k, v) for k, v in kw.items())
        r = ihttp.request(self.port, "GET", "/__mode?" + q, timeout=5)
        assert r.status == 200, r

    def events(self):
        out = []
        try:
            with open(self.log_path, "rb") as f:
                for line in f:
                    if line.endswith(b"\n"):
                        out.append(json.loads(line))
        except FileNotFoundError:
            pass
        return out

    def execs(self):
        return [e for e in self.events() if e["ev"] == "exec"]

    def heads(self):
        return [e for e in self.events() if e["ev"] == "head"]


class RawServer:
    """A listener on a free 127.0.0.1 port served by a thread of this
    process: serve(conn) runs in a thread of its own per accepted
    connection (.conns keeps them, close() closes them all)."""

    def __init__(self, serve, backlog=64):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.serve = serve
        self.conns = []
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", self.port))
        self.ls.listen(backlog)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def close(self):
        # shutdown wakes the accept thread (close alone does not: it would
        # go on accepting on whatever socket reuses the descriptor number)
        try:
            self.ls.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ls.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


# -- redis-server --------------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_BASE = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


class RedisServer:
    """One private redis-server on 127.0.0.1 (a free port unless given):
    REDIS_BASE plus args, --dir workdir (and cwd) when given; a sentinel
    when sentinel_conf (a file) is given. start() waits until it answers
    PING (with user/password when it asks for them)."""

    def __init__(self, port=None, args=(), workdir=None, user=None,
                 password=None, sentinel_conf=None):
        self.port = port or free_port()
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.args = [str(a) for a in args]
        self.workdir = workdir
        self.auth = {"user": user, "password": password}
        self.sentinel_conf = sentinel_conf
        self.proc = None
        self.start()

    def argv(self):
        argv = [REDIS_SERVER]
        if self.sentinel_conf:
            argv += [self.sentinel_conf, "--sentinel"]
        argv += ["--port", str(self.port)] + REDIS_BASE + self.args
        if self.workdir and not self.sentinel_conf:
            argv += ["--dir", self.workdir]
        return argv

    def start(self):
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            if iresp.ping(self.port, **self.auth):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("redis-server did not start on %d" % self.port)

    def kill(self):
        kill_proc(self.proc)

    def restart(self):
        self.kill()
        self.start()

    def stop(self):
        if self.proc is not None:
            stop_proc(self.proc, signal.SIGTERM, 5)


class RedisTLSServer(RedisServer):
    """One private redis-server on 127.0.0.1 that speaks TLS only (--port
    0, --tls-port port) with the server certificate of certs (a
    certs.Certs), --tls-ca-cert-file certs.ca and --tls-auth-clients no (no
    client certificate asked); a sentinel when sentinel_conf is given.
    url is rediss://127.0.0.1:port/0; context() is an ssl.SSLContext
    trusting certs.ca, for resp.RespClient/call(..., context=...). start()
    waits until it answers PING over TLS. What it connects to itself
    (a master, cluster peers, a sentinel's master and replicas) is TLS only
    with args "--tls-replication yes" / "--tls-cluster yes" (RedisServers
    with certs adds them)."""

    def __init__(self, certs, port=None, args=(), workdir=None, user=None,
                 password=None, sentinel_conf=None):
        self.certs = certs
        super().__init__(port, args, workdir, user, password, sentinel_conf)
        self.url = "rediss://127.0.0.1:%d/0" % self.port

    def context(self, ca=None):
        """An ssl.SSLContext trusting ca (default: the server's own CA)."""
        return ssl.create_default_context(cafile=ca or self.certs.ca)

    def argv(self):
        c = self.certs
        argv = [REDIS_SERVER]
        if self.sentinel_conf:
            argv += [self.sentinel_conf, "--sentinel"]
        argv += ["--port", "0", "--tls-port", str(self.port),
                 "--tls-cert-file", c.cert, "--tls-key-file", c.key,
                 "--tls-ca-cert-file", c.ca, "--tls-auth-clients", "no"]
        argv += REDIS_BASE + self.args
        if self.workdir and not self.sentinel_conf:
            argv += ["--dir", self.workdir]
        return argv

    def start(self):
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.workdir)
        ctx = self.context()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            if iresp.ping(self.port, context=ctx, **self.auth):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("redis-server (TLS) did not start on %d" % self.port)


class RedisServers:
    """The redis-server processes of one test (in workdir), all killed at
    the end (stop()). With certs (a certs.Certs made with client=True)
    every one is a RedisTLSServer (TLS only) that also replicates
    (--tls-replication yes) and, in a cluster, talks to its peers
    (--tls-cluster yes) over TLS: context() and call() reach them; a
    sentinel speaks TLS on its port and to the servers it watches."""

    def __init__(self, workdir, certs=None):
        self.workdir = workdir
        self.certs = certs
        self.servers = []

    def context(self, ca=None):
        """With certs: an ssl.SSLContext trusting ca (default certs.ca);
        None without (plain RESP)."""
        if self.certs is None:
            return None
        return ssl.create_default_context(cafile=ca or self.certs.ca)

    def call(self, port, *args, **kw):
        """resp.call on port, over TLS when the servers speak it."""
        kw.setdefault("context", self.context())
        return iresp.call(port, *args, **kw)

    def try_call(self, port, *args, **kw):
        """resp.try_call on port, over TLS when the servers speak it."""
        kw.setdefault("context", self.context())
        return iresp.try_call(port, *args, **kw)

    def start(self, port=None, args=(), user=None, password=None,
              sentinel_conf=None):
        """Starts one more (RedisServer's arguments); returns it."""
        if self.certs is not None:
            s = RedisTLSServer(self.certs, port,
                               ["--tls-replication", "yes"] + list(args),
                               self.workdir, user, password, sentinel_conf)
        else:
            s = RedisServer(port, args, self.workdir, user, password,
                            sentinel_conf)
        self.servers.append(s)
        return s

    def start_sentinel(self, master_port, extra="", user=None, password=None):
        """A sentinel on a free port monitoring the master on master_port as
        "m" (down after 1 s, failover timeout 3 s; extra: more config
        lines); returns its port once it names that master."""
        sp = free_port()
        conf = os.path.join(self.workdir, "sentinel-%d.conf" % sp)
        listen = ("port 0\ntls-port %d\n" if self.certs is not None
                  else "port %d\n") % sp
        with open(conf, "w") as f:
            f.write("%sbind 127.0.0.1\ndir %s\n"
                    "sentinel monitor m 127.0.0.1 %d 1\n"
                    "sentinel down-after-milliseconds m 1000\n"
                    "sentinel failover-timeout m 3000\n%s"
                    % (listen, self.workdir, master_port, extra))
        self.start(sp, user=user, password=password, sentinel_conf=conf)
        want = [b"127.0.0.1", str(master_port).encode()]
        deadline = time.monotonic() + 20
        while self.try_call(sp, "SENTINEL", "get-master-addr-by-name", "m",
                            user=user, password=password) != want:
            if time.monotonic() >= deadline:
                raise AssertionError("the sentinel never named the master")
            time.sleep(0.1)
        return sp

    def start_cluster(self, n=3, timeout=30):
        """n masters (no replicas) made one cluster with every slot
        assigned (resp.create_cluster; over TLS, with --tls-cluster yes,
        when the servers speak it); returns their ports once every node
        says cluster_state:ok."""
        ports = [free_cluster_port() for _ in range(n)]
        args = ["--cluster-enabled", "yes"]
        if self.certs is not None:
            args += ["--tls-cluster", "yes"]
        for p in ports:
            self.start(p, args + ["--cluster-config-file", "nodes-%d.conf" % p])
        iresp.create_cluster(ports, context=self.context())
        deadline = time.monotonic() + timeout
        while not all(b"cluster_state:ok" in (self.try_call(p, "CLUSTER", "INFO") or b"")
                      for p in ports):
            if time.monotonic() >= deadline:
                raise AssertionError("the cluster never became ok")
            time.sleep(0.1)
        return ports

    def stop(self):
        for s in self.servers:
            s.kill()


# -- idemgate ------------------------------------------------------------------


def run_idemgate(args, env=None, timeout=20):
    """Run idemgate to completion (for -t, --version, bad configs).
    Returns subprocess.CompletedProcess with text stdout/stderr."""
    return subprocess.run([idemgate_bin()] + list(args), env=clean_env(env),
                          capture_output=True, timeout=timeout, text=True,
                          check=False)


def _listen_port(listen):
    return int(str(listen).rsplit(":", 1)[1])


class Idemgate:
    """One running idemgate. Built by the `idemgate` fixture factory
    (idemtest.fixtures) or directly (the exactly-once checker)."""

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

    def write_config(self, cfg):
        """Rewrites the -c file, as an operator does before a reload: cfg
        a dict (written as JSON, and kept as .config) or a str (written as
        it is: invalid JSON too). The new text replaces the file at once
        (a temporary file renamed over it): a reader never sees half."""
        tmp = self.config_path + ".new"
        with open(tmp, "w") as f:
            if isinstance(cfg, str):
                f.write(cfg)
            else:
                json.dump(cfg, f, indent=2)
        os.replace(tmp, self.config_path)
        if not isinstance(cfg, str):
            self.config = json.loads(json.dumps(cfg))

    def check_config(self):
        """`idemgate -t` on this instance's sources as they are now: its -c
        file, the flags and the environment it was started with. Returns
        the subprocess.CompletedProcess (text stdout/stderr)."""
        return run_idemgate(self.args + ["-t"], env=self.env)

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

    def access_lines(self):
        """The access log lines (msg "access"), parsed."""
        return [ln for ln in self.log_lines() if ln.get("msg") == "access"]

    def stop(self, sig=signal.SIGTERM, timeout=15):
        code = stop_proc(self.proc, sig, timeout)
        try:
            self._err.close()
        except OSError:
            pass
        assert_no_sanitizer_report(self.stderr_path)
        return code

    def kill(self):
        kill_proc(self.proc)
        return self.proc.returncode

    def alive(self):
        return self.proc.poll() is None


SANITIZER_MARKS = (b"ERROR: AddressSanitizer", b"ERROR: LeakSanitizer", b"runtime error:",
                   b"WARNING: ThreadSanitizer")


def assert_no_sanitizer_report(path):
    """Fails when an instrumented idemgate (the ASan+UBSan build of CI)
    reported an error or a leak on its stderr: a test that passed over a
    leak or undefined behaviour must not pass."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return
    for mark in SANITIZER_MARKS:
        at = text.find(mark)
        if at >= 0:
            raise AssertionError("idemgate's sanitizer report (%s):\n%s"
                                 % (path, text[at:at + 4000].decode("utf-8", "replace")))


def exit_code(g, timeout=10):
    """Waits for idemgate g (started to fail) to exit; kills it if it has
    not by the deadline (and re-raises the TimeoutExpired). Returns the exit
    code."""
    try:
        return g.proc.wait(timeout=timeout)
    finally:
        g.kill()
