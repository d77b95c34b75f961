"""10,000 connections against limits.max_connections (1000): connections
past the limit are closed at once, the ones held are served, memory stays
bounded, and everything is closed (and counted so) once the clients go."""

import resource
import selectors
import socket

from idemtest.assertions import wait_until
from idemtest.attempts import AttemptClient, fresh_request_ok
from idemtest.http import metrics
from idemtest.invariant import analyze, assert_invariant
from idemtest.procs import fd_count, free_port, rss_kib

N = 10000
MAX_CONNECTIONS = 1000


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        hard = need  # root may raise the hard limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def active(admin):
    return metrics(admin).get("idemgate_connections_active")


def test_ten_thousand_connections(idemgate, execup):
    raise_nofile(N + 2048)
    up = execup()
    admin = free_port()
    g = idemgate({"upstream": up.url, "store": "memory",
                  "admin": {"listen": "127.0.0.1:%d" % admin},
                  "limits": {"max_connections": MAX_CONNECTIONS}})
    first = fresh_request_ok(g.port)
    assert first.ok(), first
    rss0, fds0 = rss_kib(g.proc.pid), fd_count(g.proc.pid)
    socks, failed = [], 0
    sel = selectors.DefaultSelector()
    try:
        for _ in range(N):
            try:
                s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
            except OSError:
                failed += 1
                continue
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
        assert failed == 0, "%d connects failed" % failed
        closed = set()

        def settled():
            for key, _ in sel.select(0.1):
                s = key.fileobj
                try:
                    gone = s.recv(1) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    closed.add(s)
                    sel.unregister(s)
            return len(closed) + (active(admin) or 0) == N

        assert wait_until(settled, 60, 0), (len(closed), active(admin))
        held = [s for s in socks if s not in closed]
        rss1, fds1 = rss_kib(g.proc.pid), fd_count(g.proc.pid)
        print("connections: %d opened, %d closed by idemgate, %d held; RSS %d -> %d KiB, "
              "fds %d -> %d" % (N, len(closed), len(held), rss0, rss1, fds0, fds1))
        assert len(held) <= MAX_CONNECTIONS, len(held)
        assert len(held) >= MAX_CONNECTIONS - 10, len(held)  # the limit, not fewer
        assert fds1 <= fds0 + MAX_CONNECTIONS + 16, (fds0, fds1)
        # bounded: far below 64 KiB per held connection
        assert rss1 - rss0 < MAX_CONNECTIONS * 64, (rss0, rss1)
        # past the limit, a new connection is closed unanswered
        late = AttemptClient(10).post(g.port, "/pay", "late-1")
        assert late.kind == "disconnect", late
        # the held ones are served
        answers = []
        for i, s in enumerate(held[:20]):
            sel.unregister(s)
            s.setblocking(True)
            client = AttemptClient(10)
            client.socks[g.port] = s
            answers.append(client.post(g.port, "/pay", "held-%d" % i))
            client.socks = {}
        assert all(a.ok() for a in answers), answers
        assert_invariant(analyze([first, late] + answers, up.execs()))
    finally:
        for s in socks:
            s.close()
        sel.close()
    assert wait_until(lambda: active(admin) == 0, 30, 0.05), active(admin)
    assert wait_until(lambda: fd_count(g.proc.pid) <= fds0, 30, 0.05), (fds0, fd_count(g.proc.pid))
    assert g.alive()
    assert fresh_request_ok(g.port).ok()
