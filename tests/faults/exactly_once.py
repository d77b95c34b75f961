#!/usr/bin/python3
"""exactly_once.py — idemgate's exactly-once checker.

Starts a private redis-server, the execution-logging upstream (execup.py,
one port per instance) and --instances idemgate instances on that one
Redis. With --upstreams N (N >= 2) the upstream is N execup.py processes
(servers), each with one port per instance, all appending to the one
execution log, and each instance's `upstream` is a group of its port on
every server (round_robin, max_fails 1, fail_timeout_ms 500, retries
N-1: a server down is tried again every half second, so while a killed one
is away its trials are refused and go to another server); one line before
the summary counts those safe retries (the instances' "trying another"
log lines):
  upstream_group: safe_retries=.. --clients client threads work through fresh keys for --duration
seconds the way real clients do: each key is POSTed until a 2xx, retried
with full-jitter exponential backoff (50 ms to 1 s) after a timeout (4 s),
a disconnect, a cut body, 409 request_in_progress, 503, 502
upstream_unavailable or 504, for at most 40 attempts within 20 s; a 502
upstream_answer_lost is retried once to see it replayed, then accepted. Each
attempt goes to a random instance; 3% of attempts leave mid-body and 4%
leave right after sending (the exchange goes on without them); 15% of keys
are sent by two clients at once. Meanwhile faults are injected, in cycles
of about 40 s (--faults all, none, or a comma list of):
  redis_pause     Redis SIGSTOPped for 2.5 s (redis.timeout_ms 1000), SIGCONT
  upstream_slow   every answer 6 s late for 6 s (clients time out at 4 s)
  idemgate_kill   one instance SIGKILLed, started again on its port 1 s later
  upstream_cut    30% of answers cut short of their Content-Length for 3 s
  redis_restart   Redis killed and started again empty
  upstream_kill   one upstream server (execup.py process) SIGKILLed, started
                  again on its ports 2 s later; only with --upstreams 2 or
                  more (`all` leaves it out otherwise). A request none of
                  whose bytes reached it goes to another server; one sent
                  to it is never sent again (its key released: 502)
  sentinel_failover
                  SENTINEL FAILOVER m (a forced failover, no wait_replicas);
                  only with --topology sentinel
--topology sentinel puts a primary, its replica and 3 sentinels (quorum 1
each, monitoring it as "m") in place of the one Redis, and the instances
in redis.mode sentinel (redis.nodes: the sentinels, the one that runs the
failovers first); redis_pause and redis_restart are refused there (which
server would they hit after a failover?), and `all` means the other
faults.
--store lmdb puts the instances on one LMDB environment (lmdb.path in the
work directory, sync "os") and ONE listen address (what a rolling restart
on one host does; the kernel spreads the connections), with no Redis at
all; each instance still forwards through its own upstream port, so the
log says which one executed a key. The faults that need Redis are refused
there (`all` means the others); idemgate_kill SIGKILLs one of the two
processes on the shared address and starts it again on the same path.
Afterwards every answer the clients got is held against the upstream's
execution log, and ONE summary line is printed (last, on stdout):
  exactly-once: keys=.. requests=.. executions=.. duplicates=.. ...

Definitions (idemtest.invariant.analyze computes them):
  keys        keys some client sent (plus the one fresh key per instance of
              the final health check).
  requests    attempts (every HTTP request sent, including abandoned ones).
  executions  execution lines in the upstream's log for those keys (the
              upstream logs one before it answers, with a unique id that
              its answer carries in the body and in X-Exec).
  duplicates  keys, not excluded (below), with more than one execution.
  mismatched_replays
              2xx answers (complete, or the part of a cut one that arrived)
              that are not, byte for byte, their key's one execution's
              answer: an id the log does not have or that belongs to
              another key, a body that differs from the logged one, an id
              other than the key's first 2xx's, or a second fresh (not
              Idempotent-Replayed) 2xx of one execution.
  lost        keys, not excluded, whose clients never got a 2xx (gave up,
              or were answered 502 upstream_answer_lost: answer_lost counts
              those). Not a failure: the docs allow it under faults.
  unexpected  answers that are neither a 2xx nor one of docs/errors.md's
              409 request_in_progress, 503 store_unavailable, 502
              upstream_unavailable / upstream_answer_lost, 504
              upstream_timeout; a replayed error other than answer_lost; a
              lost answer for a key that never executed; executions of keys
              no client sent.
  excluded    keys that a fault lets execute again, checked apart:
              - redis_restart: Redis comes back EMPTY, so locks and records
                of keys in flight are forgotten and a retry may execute
                again. A key is excluded when its activity window (first
                attempt sent to last attempt ended, over all its clients)
                overlaps the restart ([kill, new server answering]). Keys
                completed before the kill are never retried (their clients
                got the 2xx), keys started after it are fully checked.
              - idemgate_kill: a SIGKILLed owner leaves its lock to expire
                after lock_seconds, then the key is free (docs/requests.md).
                A key is excluded when it sent an attempt to the killed
                instance before the kill and was still active at the kill.
                With --store lmdb the instances share one address, so the
                attempts do not say which instance got them: a key is
                excluded when the killed instance forwarded it (its
                upstream port logged an execution) before the kill and the
                key was still active at the kill.
              - upstream_kill: a request the killed server executed (logged)
                but never answered is released by unknown_outcome "release"
                (the client gets a 502), and the client's retry executes it
                again, legally. A key is excluded when the killed server
                logged an execution of it before the kill and the key was
                still active at the kill.
              - sentinel_failover: a forced failover without
                wait_replicas may forget a lock (docs/configuration.md says so): the old
                primary keeps taking writes from the moment its replica is
                promoted until the store leaves it (at +switch-master when
                it follows the announcements, else when the old primary
                answers READONLY, fails, or is turned into a replica, which
                closes its clients), and those writes are lost when it
                resyncs from the new one. A key is excluded when its
                activity window overlaps the failover's window: [the
                failover accepted, the old primary replicating from the
                new one]. One line per failover (before the summary line)
                gives the window, when the sentinel named the new primary,
                the keys in the window and those of them executed more than
                once while the clients ran (reexecuted); then every key of
                the window is sent once more (a probe: what a client that
                retries late would get; a replay when its record survived,
                a new execution when the failover forgot it) and
                reexecuted_probe counts the keys executed more than once
                after that:
                  sentinel_failover: at=..s window=..s switch=..s keys=..
                    reexecuted=.. reexecuted_probe=..
              With lock_seconds 30 above the clients' 20 s budget such keys
              rarely execute again; excluded_dups counts those that did.
              Their 2xx answers are still checked against their own
              executions.
              Not excluded: a record whose write failed while Redis was
              paused stays a lock until lock_seconds (docs/requests.md), then
              its key is free again; lock_seconds (30) above the 20 s budget
              keeps every client of that key from seeing it free, so such a
              key counts as a duplicate only if it executes again early,
              which would be a bug.
  errors      the non-2xx endings by error code or transport kind.

Exit status: 1 when duplicates, mismatched_replays or unexpected are above
0, or an instance does not serve a fresh request at the end; else 0.
--rss-interval N samples each instance's RSS every N s and prints the series
before the summary line (make soak).
"""

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from idemtest.attempts import AttemptClient, Policy, Recorder, fresh_request_ok, session  # noqa: E402
from idemtest.invariant import analyze  # noqa: E402
from idemtest.procs import (ExecUpstream, Idemgate, RedisServer, RedisServers,  # noqa: E402
                            free_port, idemgate_bin, rss_kib)
from idemtest.resp import try_call  # noqa: E402

FAULTS = ["redis_pause", "upstream_slow", "idemgate_kill", "upstream_cut", "redis_restart",
          "sentinel_failover", "upstream_kill"]
# Where in a cycle each fault starts (fraction of the cycle).
OFFSETS = {"redis_pause": 0.05, "upstream_slow": 0.20, "idemgate_kill": 0.42,
           "upstream_cut": 0.60, "redis_restart": 0.78, "sentinel_failover": 0.30,
           "upstream_kill": 0.50}
# Faults that need one Redis (standalone) / the sentinel topology.
STANDALONE_ONLY = {"redis_pause", "redis_restart"}
SENTINEL_ONLY = {"sentinel_failover"}
# Faults that need Redis (not with --store lmdb).
REDIS_ONLY = STANDALONE_ONLY | SENTINEL_ONLY
# Faults that need an upstream group (--upstreams 2 or more).
GROUP_ONLY = {"upstream_kill"}
UPSTREAM_KILL_DOWN_S = 2.0
# A group's fail_timeout_ms: well below UPSTREAM_KILL_DOWN_S, so that a
# killed server is tried (and refuses) while it is away.
UPSTREAM_FAIL_TIMEOUT_MS = 500
CYCLE_S = 40.0


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=45, help="seconds of load (default 45)")
    ap.add_argument("--clients", type=int, default=16, help="client threads (default 16)")
    ap.add_argument("--keys", type=int, default=0,
                    help="at most this many keys (default 0: as many as the duration allows)")
    ap.add_argument("--faults", default="all", help="all, none, or a comma list of " +
                    ",".join(FAULTS))
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--upstreams", type=int, default=1,
                    help="upstream servers (execup.py processes); 2 or more: each instance's "
                    "upstream is a group of them (default 1: one URL)")
    ap.add_argument("--store", choices=["redis", "lmdb"], default="redis",
                    help="redis (default), or lmdb: the instances on one LMDB path and one "
                    "listen address, no Redis")
    ap.add_argument("--topology", choices=["standalone", "sentinel"], default="standalone",
                    help="one Redis (default), or a primary, a replica and 3 sentinels")
    ap.add_argument("--lock-seconds", type=int, default=30,
                    help="idempotency.lock_seconds (default 30; keep it above the clients' "
                    "20 s budget, or a lock left by a failed write expires while its key is "
                    "still retried and executes again, as docs/stores.md allows)")
    ap.add_argument("--think-ms", type=float, default=20, help="mean pause between keys")
    ap.add_argument("--rss-interval", type=float, default=0)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--bin", default=None, help="idemgate binary (default $IDEMGATE_BIN "
                    "or build/idemgate)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.upstreams < 1:
        ap.error("--upstreams must be >= 1")
    if args.store == "lmdb" and args.topology != "standalone":
        ap.error("--store lmdb has no Redis topology")
    unfit = set(STANDALONE_ONLY if args.topology == "sentinel" else SENTINEL_ONLY)
    if args.store == "lmdb":
        unfit |= REDIS_ONLY
    if args.upstreams < 2:
        unfit |= GROUP_ONLY
    if args.faults == "all":
        args.fault_list = [f for f in FAULTS if f not in unfit]
    elif args.faults == "none":
        args.fault_list = []
    else:
        args.fault_list = [f.strip() for f in args.faults.split(",") if f.strip()]
        bad = [f for f in args.fault_list if f not in FAULTS]
        if bad:
            ap.error("unknown fault(s): %s" % ",".join(bad))
        bad = [f for f in args.fault_list if f in unfit]
        if bad:
            ap.error("fault(s) %s do not fit --store %s --topology %s --upstreams %d"
                     % (",".join(bad), args.store, args.topology, args.upstreams))
    return args


def log(msg):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class UpstreamServers:
    """n execup.py processes (servers), each listening on one port per
    instance, all appending to the one execution log (O_APPEND, one write
    per line: the lines of the processes never mix)."""

    def __init__(self, log_path, instances, n):
        self.servers = []
        try:
            for _ in range(n):
                self.servers.append(ExecUpstream(log_path, instances))
        except BaseException:
            self.stop()
            raise

    def upstreams(self):
        """Each instance's `upstream`: one URL, or a group of its port on
        every server."""
        if len(self.servers) == 1:
            return list(self.servers[0].urls)
        return [{"servers": [s.urls[i] for s in self.servers], "balance": "round_robin",
                 "max_fails": 1, "fail_timeout_ms": UPSTREAM_FAIL_TIMEOUT_MS,
                 "retries": len(self.servers) - 1}
                for i in range(len(self.servers[0].urls))]

    def set_mode(self, **kw):
        for s in self.servers:
            s.set_mode(**kw)

    def execs(self):
        return self.servers[0].execs()

    def stop(self):
        for s in self.servers:
            s.stop()


class Rig:
    """The processes: Redis, the upstream, the idemgate instances."""

    def __init__(self, args, workdir):
        self.workdir = workdir
        self.redis_stopped = False
        self.redis = self.up = self.servers = None
        self.lmdb = False
        self.sentinels = []
        self.gates = []
        try:
            self.start(args)
        except BaseException:
            self.stop()
            raise

    def start(self, args):
        self.lmdb = args.store == "lmdb"
        if self.lmdb:
            store = {"store": "lmdb", "lmdb": {"path": os.path.join(self.workdir, "lmdb"),
                                               "max_bytes": 256 << 20, "sync": "os"}}
        elif args.topology == "sentinel":
            store = {"store": "redis", "redis": self.start_sentinels()}
        else:
            self.redis = RedisServer()
            store = {"store": "redis", "redis": {"url": self.redis.url, "timeout_ms": 1000}}
        self.up = UpstreamServers(os.path.join(self.workdir, "exec.log"), args.instances,
                                  args.upstreams)
        shared = "127.0.0.1:%d" % free_port()  # --store lmdb: one address
        self.cfgs = [dict({
            "listen": shared if self.lmdb else "127.0.0.1:%d" % free_port(), "workers": 1,
            "admin": {"listen": "off"}, "upstream": up,
            "idempotency": {"lock_seconds": args.lock_seconds},
            "limits": {"upstream_timeout_ms": 15000},
        }, **json.loads(json.dumps(store))) for up in self.up.upstreams()]
        for i in range(args.instances):
            self.gates.append(self.start_gate(i))
        self.ports = sorted({g.port for g in self.gates})

    def start_sentinels(self):
        """A primary, its replica, 3 sentinels; the instances' redis config."""
        self.servers = RedisServers(self.workdir)
        primary = self.servers.start()
        self.servers.start(args=["--replicaof", "127.0.0.1", str(primary.port)])
        self.redis_ports = [s.port for s in self.servers.servers]
        self.sentinels = [self.servers.start_sentinel(primary.port) for _ in range(3)]
        deadline = time.time() + 30
        # SENTINEL FAILOVER answers NOGOODSLAVE until the replica is known
        # (and the sentinels know each other)
        while not all(try_call(sp, "SENTINEL", "REPLICAS", "m") and
                      len(try_call(sp, "SENTINEL", "SENTINELS", "m") or []) == 2
                      for sp in self.sentinels):
            if time.time() > deadline:
                raise RuntimeError("the sentinels never saw the replica and each other")
            time.sleep(0.2)
        return {"mode": "sentinel", "master_name": "m", "timeout_ms": 1000,
                "nodes": ["127.0.0.1:%d" % sp for sp in self.sentinels]}

    def primary_port(self):
        """The port the first sentinel names for m, or None."""
        r = try_call(self.sentinels[0], "SENTINEL", "get-master-addr-by-name", "m")
        return int(r[1]) if r else None

    def start_gate(self, i):
        g = Idemgate(self.workdir, self.cfgs[i], base=False, wait=not self.lmdb)
        if self.lmdb:
            # the port answers already (the other instance holds it): wait
            # for this one's own "listening on"
            deadline = time.time() + 15
            while "listening on" not in g.stderr():
                if not g.alive() or time.time() > deadline:
                    g.kill()
                    raise RuntimeError("idemgate %d did not start on the LMDB path (exit %r): %s"
                                       % (i, g.proc.poll(), g.stderr()[-2000:]))
                time.sleep(0.02)
        return g

    def upstream_ports(self, i):
        """The upstream ports instance i forwards to (one per server)."""
        return [s.ports[i] for s in self.up.servers]

    def stop(self):
        if self.redis_stopped:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
        for g in self.gates:
            try:
                g.stop(timeout=10)
            except Exception:  # noqa: BLE001 - teardown goes on
                g.kill()
        if self.up:
            self.up.stop()
        if self.redis:
            self.redis.stop()
        if self.servers:
            self.servers.stop()


class Injector:
    """Runs the fault schedule in its own thread; events are recorded as
    dicts {fault, t0, t1, port}."""

    def __init__(self, rig, args, t_start):
        self.rig, self.args, self.t_start = rig, args, t_start
        self.events = []
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def schedule(self):
        d = self.args.duration
        n = max(1, int(d // CYCLE_S))
        length = d / n
        plan = []
        for c in range(n):
            for f in self.args.fault_list:
                plan.append((c * length + OFFSETS[f] * length, f, c))
        return sorted(plan)

    def run(self):
        try:
            for at, fault, cycle in self.schedule():
                if self.stop.wait(max(0, self.t_start + at - time.time())):
                    return
                getattr(self, fault)(cycle)
        except Exception as e:  # noqa: BLE001 - reported by main
            self.error = e
            log("fault injector failed: %r" % e)

    def record(self, fault, t0, port=None, **extra):
        ev = {"fault": fault, "t0": t0, "t1": time.time(), "port": port}
        ev.update(extra)
        self.events.append(ev)
        log("fault %s at %.1fs for %.1fs%s" % (fault, t0 - self.t_start, ev["t1"] - t0,
                                               " (port %d)" % port if port else
                                               " (ports %s)" % ",".join(map(str, ev["ports"]))
                                               if ev.get("ports") else ""))

    def redis_pause(self, cycle):
        t0 = time.time()
        os.kill(self.rig.redis.proc.pid, signal.SIGSTOP)
        self.rig.redis_stopped = True
        self.stop.wait(2.5)
        os.kill(self.rig.redis.proc.pid, signal.SIGCONT)
        self.rig.redis_stopped = False
        self.record("redis_pause", t0)

    def upstream_slow(self, cycle):
        t0 = time.time()
        self.rig.up.set_mode(slow_ms=6000)
        self.stop.wait(6)
        self.rig.up.set_mode(slow_ms=0)
        self.record("upstream_slow", t0)

    def upstream_cut(self, cycle):
        t0 = time.time()
        self.rig.up.set_mode(cut_ratio=0.3)
        self.stop.wait(3)
        self.rig.up.set_mode(cut_ratio=0)
        self.record("upstream_cut", t0)

    def idemgate_kill(self, cycle):
        i = cycle % len(self.rig.gates)
        t0 = time.time()
        self.rig.gates[i].kill()
        time.sleep(1)
        self.rig.gates[i] = self.rig.start_gate(i)
        self.record("idemgate_kill", t0, self.rig.gates[i].port,
                    upstream_ports=self.rig.upstream_ports(i) if self.rig.lmdb else None)

    def upstream_kill(self, cycle):
        """One upstream server SIGKILLed, started again on its ports
        UPSTREAM_KILL_DOWN_S later (the same log)."""
        srv = self.rig.up.servers[cycle % len(self.rig.up.servers)]
        t0 = time.time()
        srv.kill()
        self.stop.wait(UPSTREAM_KILL_DOWN_S)
        srv.start()
        self.record("upstream_kill", t0, ports=list(srv.ports))

    def redis_restart(self, cycle):
        t0 = time.time()
        self.rig.redis.kill()
        time.sleep(0.5)
        self.rig.redis.start()
        self.record("redis_restart", t0)

    def sentinel_failover(self, cycle):
        """SENTINEL FAILOVER m on the first sentinel; over when the old
        primary replicates from the new one (the sentinel turned it into a
        replica, closing its clients)."""
        rig = self.rig
        old = rig.primary_port()
        new = [p for p in rig.redis_ports if p != old][0]
        deadline = time.time() + 30
        while try_call(rig.sentinels[0], "SENTINEL", "FAILOVER", "m") != b"OK":
            if time.time() > deadline:
                raise RuntimeError("SENTINEL FAILOVER refused for 30 s")
            time.sleep(0.1)
        t0 = time.time()
        while rig.primary_port() != new:
            if time.time() > t0 + 60:
                raise RuntimeError("the sentinel never named the new primary")
            time.sleep(0.02)
        t_switch = time.time()
        while b"master_link_status:up" not in (try_call(old, "INFO", "replication") or b""):
            if time.time() > t0 + 90:
                raise RuntimeError("the old primary never replicated from the new one")
            time.sleep(0.05)
        self.record("sentinel_failover", t0, switch=t_switch - t0)


class RssSampler:
    def __init__(self, rig, interval, t_start):
        self.rig, self.interval, self.t_start = rig, interval, t_start
        self.series = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(self.interval):
            self.series.append((time.time() - self.t_start,
                                [(g.proc.pid, rss_kib(g.proc.pid, missing=0))
                                 for g in self.rig.gates]))

    def lines(self):
        out = []
        for t, per in self.series:
            out.append("rss t=%4.0fs " % t + " ".join(
                "ig%d=%.1fMiB(pid %d)" % (i, kib / 1024.0, pid)
                for i, (pid, kib) in enumerate(per)))
        return out


class Keys:
    """Fresh keys for the clients; a share of them is handed to a second
    client at once (a double submit)."""

    def __init__(self, args):
        self.lock = threading.Lock()
        self.n = 0
        self.max = args.keys
        self.prefix = "eo%d" % args.seed
        self.again = []

    def take(self, rng):
        with self.lock:
            if self.again:
                return self.again.pop()
            if self.max and self.n >= self.max:
                return None
            self.n += 1
            key = "%s-%d" % (self.prefix, self.n)
            if rng.random() < 0.15:
                self.again.append(key)
            return key


def path_for(key):
    """The target of a key (the same on every retry: it is fingerprinted)."""
    return "/pay?ms=%d" % (zlib.crc32(key.encode()) % 60)


def client_loop(i, rig, keys, policy, args, rec, t_end, stop):
    rng = random.Random(args.seed * 1000 + i)
    client = AttemptClient(policy.attempt_timeout)
    try:
        while time.time() < t_end and not stop.is_set():
            key = keys.take(rng)
            if key is None:
                return
            session(client, rig.ports, path_for(key), key, policy, rng, rec, sid=i)
            time.sleep(rng.uniform(0, 2 * args.think_ms / 1000.0))
    finally:
        client.close()


def exclusions(attempts, events, execs=()):
    """{key: reason} for keys a fault lets execute again (module docstring)."""
    killed = {}  # key: [(port, t)] of its executions, for upstream_kill
    for e in execs:
        killed.setdefault(e["key"], []).append((e["port"], e["t"]))
    win = {}
    ports = {}
    for a in attempts:
        lo, hi = win.get(a.key, (a.t0, a.t1))
        win[a.key] = (min(lo, a.t0), max(hi, a.t1))
        ports.setdefault(a.key, []).append((a.port, a.t0))
    out = {}
    for ev in events:
        for key, (lo, hi) in win.items():
            if key in out:
                continue
            if ev["fault"] == "redis_restart" and lo <= ev["t1"] and hi >= ev["t0"]:
                out[key] = "redis_restart"
            elif ev["fault"] == "sentinel_failover" and lo <= ev["t1"] and hi >= ev["t0"]:
                out[key] = "sentinel_failover"
            elif ev["fault"] == "idemgate_kill" and ev.get("upstream_ports") and \
                    lo <= ev["t0"] <= hi and any(p in ev["upstream_ports"] and t <= ev["t0"]
                                                 for p, t in killed.get(key, ())):
                out[key] = "idemgate_kill"  # one shared address (--store lmdb)
            elif ev["fault"] == "idemgate_kill" and not ev.get("upstream_ports") and \
                    lo <= ev["t0"] <= hi and any(p == ev["port"] and t0 <= ev["t0"]
                                                 for p, t0 in ports[key]):
                out[key] = "idemgate_kill"
            elif ev["fault"] == "upstream_kill" and lo <= ev["t0"] <= hi and any(
                    p in ev["ports"] and t <= ev["t0"] for p, t in killed.get(key, ())):
                out[key] = "upstream_kill"
    return out


def failover_keys(attempts, ev):
    """The keys whose activity window overlaps a sentinel_failover's."""
    win = {}
    for a in attempts:
        lo, hi = win.get(a.key, (a.t0, a.t1))
        win[a.key] = (min(lo, a.t0), max(hi, a.t1))
    return sorted(k for k, (lo, hi) in win.items() if lo <= ev["t1"] and hi >= ev["t0"])


def probe_keys(rig, keys, rec, seed):
    """Sends each key once more (4 threads, no abandoned attempts)."""
    policy = Policy(attempt_timeout=4, max_attempts=40, budget=20)
    todo = list(keys)
    lock = threading.Lock()

    def work(i):
        rng = random.Random(seed * 7919 + i)
        client = AttemptClient(policy.attempt_timeout)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    key = todo.pop()
                session(client, rig.ports, path_for(key), key, policy, rng, rec,
                        sid="probe%d" % i)
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)


def count_reexecuted(keys, execs):
    nexec = {}
    for e in execs:
        nexec[e["key"]] = nexec.get(e["key"], 0) + 1
    return sum(1 for k in keys if nexec.get(k, 0) > 1)


def failover_line(ev, keys, again, again_probe, t_start):
    return ("sentinel_failover: at=%.1fs window=%.1fs switch=%.1fs keys=%d reexecuted=%d "
            "reexecuted_probe=%d" % (ev["t0"] - t_start, ev["t1"] - ev["t0"], ev["switch"],
                                     len(keys), again, again_probe))


def final_health(rig, rec):
    bad = []
    for i, g in enumerate(rig.gates):
        if not g.alive():
            bad.append("ig%d exited %r" % (i, g.proc.returncode))
            continue
        a = fresh_request_ok(g.port)
        rec(a)
        if not a.ok():
            bad.append("ig%d: %r" % (i, a))
    return bad


def safe_retries(workdir):
    """Requests the instances sent to another server of their group after
    a failure before any byte was written (their log lines)."""
    n = 0
    for name in os.listdir(workdir):
        if name.startswith("idemgate-") and name.endswith(".log"):
            with open(os.path.join(workdir, name), "rb") as f:
                n += sum(1 for ln in f if b"failed before the request was sent" in ln)
    return n


def dump(workdir, attempts, events):
    with open(os.path.join(workdir, "attempts.jsonl"), "w") as f:
        for ev in events:
            f.write(json.dumps({"fault": ev}) + "\n")
        for a in sorted(attempts, key=lambda a: a.t0):
            f.write(json.dumps({"key": a.key, "port": a.port, "t0": a.t0, "t1": a.t1,
                                "kind": a.kind, "status": a.status, "code": a.code,
                                "replayed": a.replayed, "abandon": a.abandon,
                                "session": a.session, "exec": a.header("X-Exec"),
                                "body": a.body.decode("latin-1")}) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.bin:
        os.environ["IDEMGATE_BIN"] = os.path.abspath(args.bin)
    if not os.path.exists(idemgate_bin()):
        sys.exit("idemgate binary not found at %s (--bin)" % idemgate_bin())
    workdir = tempfile.mkdtemp(prefix="exactly-once-")
    rig = Rig(args, workdir)
    policy = Policy(attempt_timeout=4, max_attempts=40, budget=20,
                    abandon_midbody=0.03, abandon_noread=0.04)
    rec = Recorder()
    keys = Keys(args)
    t_start = time.time()
    t_end = t_start + args.duration
    stop = threading.Event()
    inj = Injector(rig, args, t_start)
    rss = RssSampler(rig, args.rss_interval, t_start) if args.rss_interval > 0 else None
    log("exactly-once: %d clients, %d instances, %d upstream server(s), %s, faults=%s, %.0fs, "
        "seed %d, work dir %s"
        % (args.clients, args.instances, args.upstreams,
           "lmdb, one address" if args.store == "lmdb" else args.topology,
           ",".join(args.fault_list) or "none",
           args.duration, args.seed, workdir))
    threads = [threading.Thread(target=client_loop,
                                args=(i, rig, keys, policy, args, rec, t_end, stop),
                                daemon=True) for i in range(args.clients)]
    try:
        inj.thread.start()
        if rss:
            rss.thread.start()
        for t in threads:
            t.start()
        # a session started before t_end ends within its budget
        join_by = t_end + policy.budget + policy.attempt_timeout + 30
        for t in threads:
            t.join(max(0.1, join_by - time.time()))
        hung = sum(1 for t in threads if t.is_alive())
        inj.stop.set()
        inj.thread.join(30)
        if rss:
            rss.stop.set()
            rss.thread.join(5)
        health = final_health(rig, rec)
        if hung:
            health.append("%d client thread(s) did not finish" % hung)
        if inj.error:
            health.append("fault injector: %r" % inj.error)
        fo = [(ev, failover_keys(rec.snapshot(), ev)) for ev in inj.events
              if ev["fault"] == "sentinel_failover"]
        fo_again = [count_reexecuted(keys, rig.up.execs()) for _, keys in fo]
        for _, keys in fo:
            probe_keys(rig, keys, rec, args.seed)
        attempts = rec.snapshot()
        execs = rig.up.execs()
        rep = analyze(attempts, execs, exclusions(attempts, inj.events, execs))
        fo_lines = [failover_line(ev, keys, again, count_reexecuted(keys, execs), t_start)
                    for (ev, keys), again in zip(fo, fo_again)]
    finally:
        stop.set()
        rig.stop()
    if rep.failed() or args.verbose:
        for d in rep.details:
            log(d)
    for h in health:
        log("health: " + h)
    if rss:
        for line in rss.lines():
            print(line)
    for line in fo_lines:
        print(line)
    if args.upstreams > 1:
        print("upstream_group: safe_retries=%d" % safe_retries(workdir))
    print("exactly-once: %s faults=%s duration=%.0fs clients=%d instances=%d%s%s health=%s"
          % (rep.line(), ",".join("%s:%d" % (f, sum(1 for e in inj.events if e["fault"] == f))
                                  for f in args.fault_list) or "none",
             args.duration, args.clients, args.instances,
             " upstreams=%d" % args.upstreams if args.upstreams > 1 else "",
             " store=lmdb" if args.store == "lmdb" else "",
             "ok" if not health else "FAILED"))
    sys.stdout.flush()
    if args.keep:
        dump(workdir, attempts, inj.events)
        log("work dir kept: %s (exec.log, attempts.jsonl, idemgate-*.log)" % workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if rep.failed() or health else 0


if __name__ == "__main__":
    sys.exit(main())
