"""Slowloris (docs/configuration.md: client_timeout_ms bounds the whole time to
receive a request, head and body, not each read): 60 clients drip a head
and 60 a body, one byte every 100 ms, for a request that would take far
longer than client_timeout_ms (1500) to arrive. Each is answered 408 or
closed before its request is complete, nothing reaches the upstream or
locks its key, and a normal client is served all along."""

import selectors
import socket
import threading
import time

from idemtest.assertions import wait_until
from idemtest.attempts import fresh_request_ok
from idemtest.http import BODY, post_bytes
from idemtest.invariant import analyze, assert_invariant

CLIENT_TIMEOUT_MS = 1500
TICK = 0.1
PAD = "x" * 400  # a head of ~550 bytes: ~55 s at one byte per tick


class Dripper:
    def __init__(self, port, key, body_only):
        head, body = post_bytes("/pay", key, BODY, host="127.0.0.1:%d" % port)
        head = head.replace(b"\r\n\r\n", ("\r\nX-Pad: %s\r\n\r\n" % PAD).encode())
        self.key = key
        self.data = head + body
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setblocking(False)
        self.sent = 0
        if body_only:  # the whole head at once, then the body byte by byte
            self.data = head + BODY + b"y" * 1000
            self.data = self.data.replace(b"Content-Length: %d" % len(BODY),
                                          b"Content-Length: %d" % (len(BODY) + 1000))
            self.sock.sendall(self.data[:len(head)])
            self.sent = len(head)
        self.t0 = time.monotonic()
        self.t_closed = None
        self.got = b""

    def drip(self):
        if self.t_closed is not None or self.sent >= len(self.data):
            return
        try:
            self.sent += self.sock.send(self.data[self.sent:self.sent + 1])
        except OSError:
            self.closed()
            return
        if self.sent >= len(self.data):
            self.closed()  # complete: idemgate did not stop it (the test fails)

    def readable(self):
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self.got += chunk
        else:
            self.closed()

    def closed(self):
        if self.t_closed is None:
            self.t_closed = time.monotonic()


def normal_traffic(port, stop, out):
    i = 0
    while not stop.is_set() and i < 200:
        out.append(fresh_request_ok(port, "normal-%d" % i))
        i += 1
        time.sleep(0.2)


def test_slowloris_heads_and_bodies(idemgate, redis, execup):
    up = execup()
    g = idemgate({"upstream": up.url, "store": "redis", "redis": {"url": redis.url},
                  "limits": {"client_timeout_ms": CLIENT_TIMEOUT_MS}})
    stop = threading.Event()
    normal = []
    t = threading.Thread(target=normal_traffic, args=(g.port, stop, normal), daemon=True)
    t.start()
    drippers = ([Dripper(g.port, "slow-head-%d" % i, False) for i in range(60)] +
                [Dripper(g.port, "slow-body-%d" % i, True) for i in range(60)])
    sel = selectors.DefaultSelector()
    for d in drippers:
        sel.register(d.sock, selectors.EVENT_READ, d)
    deadline = time.monotonic() + 25
    next_drip = time.monotonic()
    try:
        while time.monotonic() < deadline and any(d.t_closed is None for d in drippers):
            for key, _ in sel.select(max(0, next_drip - time.monotonic())):
                d = key.data
                d.readable()
                if d.t_closed is not None:
                    sel.unregister(d.sock)
            if time.monotonic() >= next_drip:
                next_drip += TICK
                for d in drippers:
                    d.drip()
    finally:
        stop.set()
        t.join(30)
        for d in drippers:
            d.sock.close()
    still_open = [d.key for d in drippers if d.t_closed is None]
    assert not still_open, "not closed: %r" % still_open
    for d in drippers:
        # closed by idemgate before the request was complete
        assert d.sent < len(d.data), (d.key, d.sent, len(d.data))
        if d.got:
            assert d.got.startswith(b"HTTP/1.1 408 "), (d.key, d.got[:200])
            assert d.got.count(b"HTTP/1.1") == 1, d.got
    slowest = max(d.t_closed - d.t0 for d in drippers)
    print("slowloris: %d drippers closed, %d with a 408, slowest after %.2fs; "
          "%d normal requests" % (len(drippers), sum(1 for d in drippers if d.got),
                                  slowest, len(normal)))
    assert normal and all(a.ok() and not a.replayed for a in normal), \
        [a for a in normal if not a.ok()][:5]
    execs = up.execs()
    assert not [e for e in execs if e["key"].startswith("slow-")], "a dripped request executed"
    rep = analyze(normal, execs)
    assert_invariant(rep)
    # the dripped keys were never locked: each executes now, once
    for d in drippers[:3] + drippers[-3:]:
        a = fresh_request_ok(g.port, d.key)
        assert a.ok() and not a.replayed, a
    assert wait_until(lambda: len(up.execs()) == len(execs) + 6, 5, 0.05)
    assert g.alive()
