#!/usr/bin/env python3
"""Helpers for bench/run.sh: free ports, readiness probes, and the report.

Subcommands:
  ports N                         print N free 127.0.0.1 TCP ports
  wait-redis PORT TIMEOUT_S       wait until redis answers PING
  probe URL TIMEOUT_S [KEY]       wait for a 200 to the bench POST (with an
                                  Idempotency-Key when KEY is given)
  expect-replay URL KEY           the POST with KEY must come back 200 with
                                  Idempotent-Replayed: true
  warm URL PREFIX N               execute replay keys PREFIX-replay-1..N once
                                  each, then check that each one replays
  snapshot OUT.json REDIS_PORT METRICS_URL|-
                                  redis DBSIZE and idemgate_requests_total
  delta BEFORE.json AFTER.json    what one run changed, as a JSON fragment
  meta OUT.json K=V...            write run metadata (K_list=V splits on spaces)
  report RUNS.jsonl OUT.json META.json
                                  medians over rounds, print table, write JSON
Only the standard library; never asserts on numbers.
"""
import http.client
import json
import socket
import statistics
import sys
import time

# Same 80-byte body as bench/common.lua.
_HEAD = '{"order_id":"ord_000123","amount_cents":1999,"currency":"EUR","note":"'
_TAIL = '"}'
BODY = (_HEAD + "x" * (80 - len(_HEAD) - len(_TAIL)) + _TAIL).encode()


def cmd_ports(n):
    socks, ports = [], []
    for _ in range(int(n)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))
    return 0


def cmd_wait_redis(port, timeout_s):
    deadline = time.monotonic() + float(timeout_s)
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", int(port)), 1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return 0
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    print(f"redis on port {port} did not answer PING within {timeout_s}s ({last})", file=sys.stderr)
    return 1


def _post(url, key):
    assert url.startswith("http://")
    hostport, _, path = url[len("http://"):].partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    try:
        conn.request("POST", "/" + path, body=BODY, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), body
    finally:
        conn.close()


def cmd_probe(url, timeout_s, key=None):
    deadline = time.monotonic() + float(timeout_s)
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, _, body = _post(url, key)
            if status == 200:
                return 0
            last = f"status {status}: {body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    print(f"{url} did not answer 200 within {timeout_s}s (last: {last})", file=sys.stderr)
    return 1


def cmd_expect_replay(url, key):
    try:
        status, headers, body = _post(url, key)
    except OSError as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1
    if status != 200 or headers.get("idempotent-replayed") != "true":
        print(f"{url} key {key}: expected a 200 replay, got {status} "
              f"Idempotent-Replayed={headers.get('idempotent-replayed')!r} {body[:200]!r}",
              file=sys.stderr)
        return 1
    return 0


def cmd_warm(url, prefix, n):
    """Executes every replay key once, then checks each one replays."""
    keys = [f"{prefix}-replay-{k}" for k in range(1, int(n) + 1)]
    for key in keys:
        try:
            status, _, body = _post(url, key)
        except OSError as e:
            print(f"warm-up {url} key {key}: {e}", file=sys.stderr)
            return 1
        if status != 200:
            print(f"warm-up {url} key {key}: status {status} {body[:200]!r}", file=sys.stderr)
            return 1
    for key in keys:
        if cmd_expect_replay(url, key) != 0:
            return 1
    return 0


def cmd_meta(out_path, *pairs):
    """Writes KEY=VALUE pairs as a JSON object; *_list values split on spaces,
    integer-looking values become numbers."""
    meta = {}
    for p in pairs:
        k, _, v = p.partition("=")
        if k.endswith("_list"):
            meta[k[:-5]] = v.split()
        elif v.isdigit():
            meta[k] = int(v)
        else:
            meta[k] = v
    with open(out_path, "w") as f:
        json.dump(meta, f)
    return 0


def _redis_dbsize(port):
    with socket.create_connection(("127.0.0.1", int(port)), 2) as s:
        s.sendall(b"DBSIZE\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b":"):
        raise OSError(f"unexpected DBSIZE reply {data!r}")
    return int(data[1:].strip())


def _outcomes(metrics_url):
    """idemgate_requests_total by outcome, or {} while /metrics is absent."""
    if metrics_url in ("", "-"):
        return {}
    hostport = metrics_url[len("http://"):].partition("/")[0]
    host, _, port = hostport.rpartition(":")
    out = {}
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=2)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        conn.close()
    except OSError:
        return {}
    if resp.status != 200:
        return {}
    for ln in text.splitlines():
        if not ln.startswith("idemgate_requests_total{"):
            continue
        labels, _, value = ln.rpartition(" ")
        marker = 'outcome="'
        i = labels.find(marker)
        if i < 0:
            continue
        name = labels[i + len(marker):].partition('"')[0]
        try:
            out[name] = out.get(name, 0) + float(value)
        except ValueError:
            pass
    return out


def cmd_snapshot(out_path, redis_port, metrics_url):
    """Store size and outcome counters, before or after one idemgate run."""
    snap = {"dbsize": None, "outcomes": _outcomes(metrics_url)}
    try:
        snap["dbsize"] = _redis_dbsize(redis_port)
    except OSError as e:
        print(f"snapshot: redis DBSIZE failed: {e}", file=sys.stderr)
    with open(out_path, "w") as f:
        json.dump(snap, f)
    return 0


def cmd_delta(before_path, after_path):
    """Prints a JSON fragment ("key":value,...) with what one run changed."""
    with open(before_path) as f:
        a = json.load(f)
    with open(after_path) as f:
        b = json.load(f)
    keys = None
    if a["dbsize"] is not None and b["dbsize"] is not None:
        keys = b["dbsize"] - a["dbsize"]
    outcomes = {k: int(v - a["outcomes"].get(k, 0)) for k, v in b["outcomes"].items()
                if v - a["outcomes"].get(k, 0)}
    print(f'"store_keys_added":{json.dumps(keys)},"outcomes":{json.dumps(outcomes)}')
    return 0


def _median(xs):
    return statistics.median(xs) if xs else None


def _sum_known(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


def _sum_dicts(ds):
    out = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _summarize(runs):
    """Groups raw runs by (scenario, target); medians over rounds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["target"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {
            "scenario": key[0],
            "target": key[1],
            "script": rs[0]["script"],
            "rounds": len(rs),
            "rps": _median([r["rps"] for r in rs]),
            "p50_ms": _median([r["p50_us"] / 1000 for r in rs]),
            "p99_ms": _median([r["p99_us"] / 1000 for r in rs]),
            "non_2xx_3xx": sum(r["status_errors"] for r in rs),
            "socket_errors": sum(r["connect_errors"] + r["read_errors"] + r["write_errors"]
                                 + r["timeouts"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "store_keys_added": _sum_known([r.get("store_keys_added") for r in rs]),
            "outcomes": _sum_dicts([r.get("outcomes") or {} for r in rs]),
            "raw": rs,
        }
    return out


BASELINES = ("haproxy", "nginx", "direct")


def _rows(summary, scenarios, targets):
    """One row per (scenario, target). Baselines only ever run passthrough;
    under another scenario they are shown as a labelled reference."""
    rows = []
    for sc in scenarios:
        for t in targets:
            measured = summary.get((sc, t))
            ref = False
            if measured is None and t in BASELINES:
                measured = summary.get(("passthrough", t))
                ref = True
            if measured is None:
                continue
            row = dict(measured)
            row.pop("raw")
            row["scenario"] = sc
            row["reference"] = ref
            row["label"] = f"{t} (ref: passthrough)" if ref else t
            for b in BASELINES:
                base = summary.get(("passthrough", b))
                row[f"vs_{b}"] = (row["rps"] / base["rps"]) if base and base["rps"] else None
            for k, nd in (("rps", 1), ("p50_ms", 3), ("p99_ms", 3), ("vs_haproxy", 3),
                          ("vs_nginx", 3), ("vs_direct", 3)):
                if row[k] is not None:
                    row[k] = round(row[k], nd)
            rows.append(row)
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _print_table(rows, meta):
    hdr = ["scenario", "target", "req/s", "p50 ms", "p99 ms", "non-2xx/3xx", "sock err",
           "vs HAProxy", "vs nginx", "vs direct"]
    lines = []
    for r in rows:
        lines.append([r["scenario"], r["label"], _fmt(r["rps"], ",.0f"), _fmt(r["p50_ms"], ".3f"),
                      _fmt(r["p99_ms"], ".3f"), str(r["non_2xx_3xx"]), str(r["socket_errors"]),
                      _fmt(r["vs_haproxy"], ".2f"), _fmt(r["vs_nginx"], ".2f"),
                      _fmt(r["vs_direct"], ".2f")])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(hdr)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    print()
    print(f"wrk -t1 -c{meta['conns']} -d{meta['duration']}, {meta['rounds']} round(s), "
          f"medians over rounds; non-2xx/3xx and socket errors are totals over rounds")
    print(line(hdr))
    print(line(["-" * w for w in widths]))
    prev = None
    for cells in lines:
        if prev is not None and cells[0] != prev:
            print()
        prev = cells[0]
        print(line(cells))
    print()
    print("Ratios are req/s divided by the baseline's passthrough req/s. Baselines have no")
    print("idempotency: under other scenarios their passthrough numbers are repeated as reference.")
    checks = [r for r in rows if r["target"] == "idemgate" and r["store_keys_added"] is not None]
    if checks:
        print("What idemgate did (totals over rounds; wrk counts only completed responses):")
        for r in checks:
            oc = ", ".join(f"{k} {v:,}" for k, v in sorted(r["outcomes"].items())) or \
                "n/a (no /metrics)"
            print(f"  {r['scenario']:<16} {r['requests']:>9,} requests, "
                  f"{r['store_keys_added']:>9,} new store keys; outcomes: {oc}")
    rss = meta.get("idemgate_peak_rss_kb")
    if rss is not None:
        print(f"idemgate peak RSS (VmHWM): {rss / 1024:.1f} MiB ({rss} kB)")
    print(f"Caveat: {meta['cpus']} CPU(s) shared by wrk, the proxy under test, the upstream and redis; "
          "numbers are noisy, compare ratios.")


def cmd_report(runs_path, out_path, meta_path):
    with open(meta_path) as f:
        meta = json.load(f)
    runs = []
    with open(runs_path) as f:
        for ln in f:
            ln = ln.strip()
            if ln:
                runs.append(json.loads(ln))
    summary = _summarize(runs)
    scenarios = meta["scenarios"]
    targets = [t for t in ("idemgate",) + BASELINES if t in meta["targets"]]
    rows = _rows(summary, scenarios, targets)
    _print_table(rows, meta)
    doc = {"meta": meta, "results": rows, "runs": runs}
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"results written to {out_path}")
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmds = {"ports": cmd_ports, "wait-redis": cmd_wait_redis, "probe": cmd_probe,
            "expect-replay": cmd_expect_replay, "warm": cmd_warm, "meta": cmd_meta,
            "snapshot": cmd_snapshot, "delta": cmd_delta,
            "report": cmd_report}
    fn = cmds.get(argv[1])
    if fn is None:
        print(__doc__, file=sys.stderr)
        return 2
    return fn(*argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
