"""docs/configuration.md: who may share a listen address. Two instances on one
store (Redis) share it (SO_REUSEPORT: a rolling restart); a memory-store
instance never shares its address, and an instance that would join an
address held by one with another store exits 1 with one line, `cannot
listen on ADDR: held by another idemgate using the ... store`: two stores
behind one address would let a key run twice. Both orders, the wildcard
address, IPv6, and the admin listener's bind error (it says why)."""

import socket
import time

import pytest

from idemtest.config import store_config
from idemtest.http import hdrs, request
from idemtest.procs import exit_code, free_port, have_ipv6_loopback, run_idemgate


def gate_cfg(kind, redis, upstream, listen, **top):
    cfg = dict(store_config(kind, redis), upstream=upstream.url, listen=listen)
    cfg.update(top)
    return cfg


def log_msgs(g):
    return [ln.get("msg", ln.get("_raw")) for ln in g.log_lines()]


def assert_refused(idemgate, cfg, line):
    """An idemgate started with cfg exits 1 with exactly that one line."""
    g = idemgate(cfg, wait=False)
    try:
        code = exit_code(g, timeout=10)
    except Exception:  # noqa: BLE001 - still running: it joined the address
        pytest.fail("second idemgate did not exit; stderr:\n%s" % g.stderr())
    assert code == 1, (code, g.stderr())
    assert log_msgs(g) == [line], g.stderr()


def assert_serves(g, upstream, key):
    """g answers a covered request (and a replay of it)."""
    for _ in range(2):
        r = request(g.port, "POST", "/count", hdrs(key), b"{}")
        assert r.status == 201, r
    assert upstream.count(key) == 1


def started_listening(g, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m and "listening on" in m for m in log_msgs(g)):
            return True
        if not g.alive():
            return False
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("second", ["memory", "redis"])
def test_memory_first_refuses_a_second(idemgate, upstream, redis, second):
    listen = "127.0.0.1:%d" % free_port()
    first = idemgate(gate_cfg("memory", None, upstream, listen))
    assert_refused(idemgate, gate_cfg(second, redis, upstream, listen),
                   "cannot listen on %s: held by another idemgate using the memory store"
                   % listen)
    assert first.alive()
    assert_serves(first, upstream, "after-refusal")


def test_redis_first_refuses_memory(idemgate, upstream, redis):
    listen = "127.0.0.1:%d" % free_port()
    first = idemgate(gate_cfg("redis", redis, upstream, listen))
    assert_refused(idemgate, gate_cfg("memory", None, upstream, listen),
                   "cannot listen on %s: held by another idemgate using the redis store"
                   % listen)
    assert first.alive()
    assert_serves(first, upstream, "after-refusal")


def test_two_redis_instances_share_and_hand_over(idemgate, upstream, redis):
    """The rolling restart: a second instance on the same Redis joins the
    address, the kernel spreads connections over both, one key still runs
    once, and after the first stops the second serves alone."""
    listen = "127.0.0.1:%d" % free_port()
    old = idemgate(gate_cfg("redis", redis, upstream, listen))
    new = idemgate(gate_cfg("redis", redis, upstream, listen), wait=False)
    assert started_listening(new), new.stderr()
    for i in range(40):
        r = request(old.port, "POST", "/count", hdrs("shared"), b"{}")
        assert r.status == 201, (i, r)
    assert upstream.count("shared") == 1
    assert old.access_lines() and new.access_lines(), \
        "connections did not reach both instances"
    assert old.stop() == 0
    assert new.alive()
    assert_serves(new, upstream, "after-handover")


def test_workers_of_one_memory_instance_share(idemgate, upstream):
    g = idemgate(gate_cfg("memory", None, upstream, "127.0.0.1:%d" % free_port(),
                          workers=3))
    for i in range(12):
        assert_serves(g, upstream, "w-%d" % i)


def test_wildcard_overlaps_a_specific_address(idemgate, upstream, redis):
    port = free_port()
    first = idemgate(gate_cfg("memory", None, upstream, "127.0.0.1:%d" % port))
    assert_refused(idemgate, gate_cfg("redis", redis, upstream, "0.0.0.0:%d" % port),
                   "cannot listen on 0.0.0.0:%d: held by another idemgate using the memory store"
                   % port)
    first.stop()
    first = idemgate(gate_cfg("redis", redis, upstream, "0.0.0.0:%d" % port))
    assert_refused(idemgate, gate_cfg("memory", None, upstream, "127.0.0.1:%d" % port),
                   "cannot listen on 127.0.0.1:%d: held by another idemgate using the redis store"
                   % port)


def test_ipv6(idemgate, upstream, redis):
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    port = free_port()
    listen = "[::1]:%d" % port
    first = idemgate(gate_cfg("memory", None, upstream, listen), wait=False)
    assert started_listening(first), first.stderr()
    assert_refused(idemgate, gate_cfg("redis", redis, upstream, listen),
                   "cannot listen on %s: held by another idemgate using the memory store"
                   % listen)
    # IPv6 listeners are V6ONLY: the same port on IPv4 is another address.
    v4 = idemgate(gate_cfg("memory", None, upstream, "127.0.0.1:%d" % port))
    assert_serves(v4, upstream, "v4")


def test_memory_never_joins_another_program():
    """Not an idemgate: a plain SO_REUSEPORT listener. A memory-store
    instance does not join it (the kernel says why)."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    port = holder.getsockname()[1]
    try:
        res = run_idemgate(["--store", "memory", "--listen", "127.0.0.1:%d" % port,
                            "--admin", "off", "--workers", "1"], timeout=10)
        assert res.returncode == 1, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, res.stderr
        assert "cannot listen on 127.0.0.1:%d: Address already in use" % port in lines[0]
    finally:
        holder.close()


def test_admin_bind_error_says_why(idemgate, upstream):
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    admin = "127.0.0.1:%d" % holder.getsockname()[1]
    try:
        assert_refused(idemgate, gate_cfg("memory", None, upstream,
                                          "127.0.0.1:%d" % free_port(),
                                          admin={"listen": admin}),
                       "cannot listen on admin address %s: Address already in use" % admin)
    finally:
        holder.close()


def test_admin_is_bound_before_the_proxy_address(idemgate, upstream):
    """An instance that cannot bind its admin address fails before it
    touches the proxy address: in a rolling restart it must not join the
    shared address, take connections there, then drop them on its way out.
    Here the proxy address is held as well, and the admin error is the one
    reported."""
    listen = "127.0.0.1:%d" % free_port()
    idemgate(gate_cfg("memory", None, upstream, listen))
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    admin = "127.0.0.1:%d" % holder.getsockname()[1]
    try:
        assert_refused(idemgate, gate_cfg("memory", None, upstream, listen,
                                          admin={"listen": admin}),
                       "cannot listen on admin address %s: Address already in use" % admin)
    finally:
        holder.close()
