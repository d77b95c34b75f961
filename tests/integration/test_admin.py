"""docs/admin.md: the admin listener — /healthz, /readyz (the store
answers, else 503) and /metrics in the Prometheus text format, with the
metric names docs/metrics.md lists and counters that move with what the proxy did."""

import re
import threading
import time

from idemtest.assertions import wait_until
from idemtest.http import Client, hdrs, metrics, request
from idemtest.procs import free_port, wait_port


def start(idemgate, upstream, extra=None):
    admin = free_port()
    cfg = {"upstream": upstream.url, "store": "memory",
           "admin": {"listen": "127.0.0.1:%d" % admin}}
    cfg.update(extra or {})
    g = idemgate(cfg)
    assert wait_port(admin)
    return g, admin


def metrics_when(admin, ready, timeout=5.0):
    """/metrics once ready(m) holds: the counters of an exchange move when
    it ends, which may be just after its client got the last byte."""
    deadline = time.time() + timeout
    m = metrics(admin)
    while not ready(m) and time.time() < deadline:
        time.sleep(0.05)
        m = metrics(admin)
    return m


def test_healthz_and_readyz_memory(idemgate, upstream):
    _, admin = start(idemgate, upstream)
    assert request(admin, "GET", "/healthz").status == 200
    assert request(admin, "GET", "/readyz").status == 200


def test_readyz_follows_redis(idemgate, upstream, redis):
    admin = free_port()
    idemgate({"upstream": upstream.url, "store": "redis",
              "redis": {"url": redis.url, "timeout_ms": 300},
              "admin": {"listen": "127.0.0.1:%d" % admin}})
    assert wait_port(admin)  # the admin thread may listen after the proxy
    assert request(admin, "GET", "/readyz").status == 200
    redis.kill()
    assert request(admin, "GET", "/readyz").status == 503
    assert request(admin, "GET", "/healthz").status == 200
    redis.restart()
    # reconnects by itself (bounded wait, not a timing assertion)
    assert wait_until(lambda: request(admin, "GET", "/readyz").status == 200, 15, 0.2)


def test_metrics_names_and_outcomes(idemgate, upstream):
    g, admin = start(idemgate, upstream)
    h = hdrs("m-1")
    assert request(g.port, "POST", "/count", h, b"{}").status == 201
    assert request(g.port, "POST", "/count", h, b"{}").status == 201  # replay
    assert request(g.port, "POST", "/count", h, b'{"x":1}').status == 409  # mismatch
    assert request(g.port, "GET", "/echo").status == 200  # passthrough
    m = metrics_when(admin, lambda m: m.get('idemgate_requests_total{outcome="passthrough"}') == 1)
    for outcome in ("executed", "replayed", "in_progress", "mismatch", "passthrough",
                    "rejected", "not_cached", "store_error"):
        assert 'idemgate_requests_total{outcome="%s"}' % outcome in m
    assert m['idemgate_requests_total{outcome="executed"}'] == 1
    assert m['idemgate_requests_total{outcome="replayed"}'] == 1
    assert m['idemgate_requests_total{outcome="mismatch"}'] == 1
    assert m['idemgate_requests_total{outcome="passthrough"}'] == 1
    for name in ("idemgate_lock_renewals_total", "idemgate_store_errors_total",
                 "idemgate_connections_active",
                 "idemgate_upstream_duration_seconds_count",
                 "idemgate_store_duration_seconds_count"):
        assert name in m, name
    assert m["idemgate_upstream_duration_seconds_count"] == 2  # executed + passthrough
    assert m["idemgate_store_duration_seconds_count"] == 3  # three acquires
    assert any(re.match(r'idemgate_upstream_duration_seconds_bucket\{le="\+Inf"\}', k)
               for k in m)


ENGINE_STATES = ("new", "acquiring", "waiting", "forwarded", "completing", "done")
UPSTREAM_STATES = ("new", "forwarding", "streaming", "ended", "done")
CLIENT_STATES = ("idle", "busy", "holding", "closing")


def families(admin):
    """{family: kind} from the TYPE lines, after checking that each family
    has its HELP line just before its TYPE line and that every sample
    belongs to the family typed last (a histogram's _bucket, _sum, _count)."""
    text = request(admin, "GET", "/metrics").body.decode()
    kinds, help_of, current = {}, None, None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            help_of = line.split(" ")[2]
            assert help_of not in kinds, line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == help_of, line
            assert kind in ("counter", "gauge", "histogram"), line
            kinds[name], current, help_of = kind, name, None
        else:
            series, value = line.rsplit(" ", 1)
            float(value)
            base = series.split("{", 1)[0]
            if kinds[current] == "histogram":
                assert base in (current + "_bucket", current + "_sum", current + "_count"), line
                assert base != current + "_bucket" or re.search(r'\{le="[^"]+"\}$', series)
            else:
                assert base == current, line
    return kinds


def test_metrics_state_gauges(idemgate, upstream):
    """The per-state gauges: one series per engine state and per transport
    state, all back to 0 once every exchange and connection is gone."""
    g, admin = start(idemgate, upstream)
    h = hdrs("s-1")
    assert request(g.port, "POST", "/count", h, b"{}").status == 201
    assert request(g.port, "POST", "/count", h, b"{}").status == 201
    assert request(g.port, "GET", "/echo").status == 200
    kinds = families(admin)
    assert kinds["idemgate_exchanges"] == "gauge"
    assert kinds["idemgate_client_connections"] == "gauge"
    assert kinds["idemgate_connections_active"] == "gauge"
    assert kinds["idemgate_requests_total"] == "counter"
    assert kinds["idemgate_upstream_duration_seconds"] == "histogram"
    assert kinds["idemgate_memory_store_entries"] == "gauge"

    series = (['idemgate_exchanges{state="%s"}' % s for s in ENGINE_STATES] +
              ['idemgate_exchanges_upstream{state="%s"}' % s for s in UPSTREAM_STATES] +
              ['idemgate_client_connections{state="%s"}' % s for s in CLIENT_STATES] +
              ["idemgate_connections_active"])
    m = metrics_when(admin, lambda m: all(m.get(k) == 0 for k in series))
    for k in series:
        assert m.get(k) == 0, (k, m.get(k))
    assert sorted(k for k in m if k.startswith(("idemgate_exchanges{",
                                                "idemgate_exchanges_upstream{",
                                                "idemgate_client_connections{"))) \
        == sorted(series[:-1])


def test_metrics_state_gauges_while_busy(idemgate, upstream):
    """A slow covered request in flight shows as one exchange forwarded by
    the engine and forwarding upstream, on one busy client; an idle
    keep-alive client beside it counts as idle; the client states add up
    to idemgate_connections_active."""
    g, admin = start(idemgate, upstream)
    idle = Client(g.port)
    assert idle.request("GET", "/echo").status == 200  # kept alive, idle now
    t = threading.Thread(target=lambda: request(g.port, "POST", "/slow?ms=1500",
                                                hdrs("busy-1"), b"{}", timeout=20),
                         daemon=True)
    t.start()

    def busy(m):
        return (m.get('idemgate_exchanges{state="forwarded"}') == 1 and
                m.get('idemgate_exchanges_upstream{state="forwarding"}') == 1 and
                m.get('idemgate_client_connections{state="busy"}') == 1)
    m = metrics_when(admin, busy)
    assert busy(m), m
    assert m.get('idemgate_client_connections{state="idle"}') == 1, m
    assert sum(m.get('idemgate_client_connections{state="%s"}' % s) for s in CLIENT_STATES) \
        == m["idemgate_connections_active"]
    t.join(20)
    idle.close()


def test_memory_store_gauges(idemgate, upstream):
    g, admin = start(idemgate, upstream, {"memory": {"max_bytes": 1048576}})
    for i in range(40):
        r = request(g.port, "POST", "/big?bytes=65536", hdrs("ev-%d" % i), b"{}")
        assert r.status == 200
    m = metrics(admin)
    assert m["idemgate_memory_store_max_bytes"] == 1048576
    assert 0 < m["idemgate_memory_store_bytes"] <= 1048576
    assert m["idemgate_store_evictions_total"] > 0
    assert "idemgate_memory_store_evictions_total" not in m  # one counter per event
    assert m['idemgate_memory_store_entries{state="in_progress"}'] == 0
