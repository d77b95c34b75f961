"""The LMDB store under kill -9 (issue 19): two idemgate processes on one
LMDB path and one listen address (sync "os"), a storm of covered requests
against the execution-logging upstream (execup.py), and at a random moment
mid-storm one or both processes SIGKILLed and started again; twenty
cycles. Then:

- the environment is not corrupted: `mdb_stat -a -e` and `mdb_dump -a`
  (lmdb-utils) read every database of it, after a last SIGKILL of both;
- the processes start again on it, and every key that got a 2xx answer
  during the loop is replayed byte for byte (the same execution: X-Exec
  and body);
- the upstream executed no key twice, and every answer the clients got is
  its key's one execution (idemtest.invariant.analyze, the analysis of the
  exactly-once checker, with no key excluded);
- after lock_seconds, every key that never got a 2xx (its lock orphaned by
  a kill) is free again and answers 2xx.

Why nothing may run twice even though orphaned locks expire: every session
of a cycle starts together and gives up BUDGET seconds after it started,
BUDGET below LOCK_SECONDS, so no client of a key is still retrying when
the lock a killed process left on it runs out (a retry after that may run
the key again, as docs/stores.md says; the last check does exactly that, apart).

Each cycle: fresh keys (every fourth sent by two clients at once) plus
keys completed in earlier cycles sent again (they must replay through the
kills); one thread per session. Bounded: each session by BUDGET plus one
attempt's timeout, each restart by a deadline, the case by its hard
timeout. The figures are printed on one line ("lmdb kill loop: ...")."""

import os
import random
import shutil
import signal
import subprocess
import threading
import time
import zlib

import pytest

from idemtest.attempts import AttemptClient, Policy, Recorder, session
from idemtest.invariant import analyze
from idemtest.procs import ExecUpstream, Idemgate, free_port
from idemtest.storm import in_threads

CYCLES = 20
FRESH_KEYS = 40  # per cycle
OLD_KEYS = 10  # keys completed in earlier cycles, sent again per cycle
LOCK_SECONDS = 3
BUDGET = 2.0  # a session's retry budget: below LOCK_SECONDS (docstring)
ATTEMPT_TIMEOUT = 3.0
MAX_BYTES = 64 << 20


def lmdb_tools():
    missing = [t for t in ("mdb_stat", "mdb_dump") if not shutil.which(t)]
    if missing:
        pytest.fail("%s not found: apt-get install lmdb-utils (scripts/deps.sh installs it)"
                    % ", ".join(missing))


def gate_cfg(listen, upstream, path):
    return {"listen": listen, "workers": 1, "admin": {"listen": "off"},
            "upstream": upstream, "store": "lmdb",
            "lmdb": {"path": path, "max_bytes": MAX_BYTES, "sync": "os"},
            "idempotency": {"lock_seconds": LOCK_SECONDS},
            "limits": {"upstream_timeout_ms": 5000, "shutdown_grace_ms": 2000},
            "log": {"access": False}}


def started(g, timeout=10):
    """Waits until g logged "listening on" (the port alone says nothing:
    the other process holds it too). Fails with its stderr otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "listening on" in g.stderr():
            return g
        if not g.alive():
            break
        time.sleep(0.01)
    raise AssertionError("idemgate did not start on the LMDB path (exit %r):\n%s"
                         % (g.proc.poll(), g.stderr()[-3000:]))


def path_for(key):
    """The target of a key, the same on every retry: 0 to 149 ms upstream."""
    return "/pay?ms=%d" % (zlib.crc32(key.encode()) % 150)


def mdb_check(path):
    """mdb_stat and mdb_dump over every database of the environment;
    returns the number of entries of idemgate's `entries` database."""
    st = subprocess.run(["mdb_stat", "-a", "-e", path], capture_output=True, text=True,
                        timeout=30, check=False)
    assert st.returncode == 0, "mdb_stat: %s%s" % (st.stdout, st.stderr)
    dump = subprocess.run(["mdb_dump", "-a", path], capture_output=True, timeout=60,
                          check=False)
    assert dump.returncode == 0, "mdb_dump: %s" % dump.stderr.decode("utf-8", "replace")
    assert b"HEADER=END" in dump.stdout, dump.stdout[:400]
    # mdb_stat -a: a "Status of <name>" block per named database
    entries = None
    block = None
    for ln in st.stdout.splitlines():
        ln = ln.strip()
        if ln.startswith("Status of "):
            block = ln[len("Status of "):]
        elif block == "entries" and ln.startswith("Entries:"):
            entries = int(ln.split(":")[1])
    assert entries is not None, st.stdout
    return entries


class Pair:
    """The two processes on one path and one address."""

    def __init__(self, workdir, cfg):
        self.workdir, self.cfg = workdir, cfg
        self.gates = [None, None]
        self.all = []

    def start(self, i):
        g = Idemgate(self.workdir, self.cfg, base=False, wait=False)
        self.all.append(g)
        self.gates[i] = started(g)

    def kill(self, which):
        for i in which:
            self.gates[i].kill()

    def stop(self):
        for g in self.all:
            if g.alive():
                try:
                    g.stop(timeout=10)
                except Exception:  # noqa: BLE001 - teardown goes on
                    g.kill()


def run_cycle(port, jobs, rng, rec, sid):
    """One session per job, all started together (one thread each)."""
    policy = Policy(attempt_timeout=ATTEMPT_TIMEOUT, max_attempts=40, budget=BUDGET,
                    backoff=0.03, backoff_cap=0.3, abandon_noread=0.03)
    seeds = [rng.random() for _ in jobs]

    def one(i):
        client = AttemptClient(ATTEMPT_TIMEOUT)
        try:
            session(client, [port], path_for(jobs[i]), jobs[i], policy,
                    random.Random(seeds[i]), rec, sid="%s-%d" % (sid, i))
        finally:
            client.close()

    in_threads(one, len(jobs), BUDGET + ATTEMPT_TIMEOUT + 20, "cycle sessions")


def killer(pair, up, rng, n0, events):
    """Waits until the upstream has executed a random number of this
    cycle's requests (or 3 s), SIGKILLs one or both processes, starts them
    again after a random pause."""
    want = rng.randint(1, FRESH_KEYS // 2)
    deadline = time.monotonic() + 3
    while len(up.execs()) - n0 < want and time.monotonic() < deadline:
        time.sleep(0.005)
    x = rng.random()
    which = [0, 1] if x < 0.3 else [0] if x < 0.65 else [1]
    t0 = time.time()
    pair.kill(which)
    time.sleep(rng.uniform(0.02, 0.3))
    for i in which:
        pair.start(i)
    events.append({"t0": t0, "t1": time.time(), "which": which,
                   "execs_before": len(up.execs()) - n0})


@pytest.mark.hard_timeout(240)
def test_kill9_loop_two_processes_one_path(tmp_path):
    lmdb_tools()
    seed = int(os.environ.get("LMDB_KILL_SEED", "19"))
    rng = random.Random(seed)
    dbpath = str(tmp_path / "lmdb")
    up = ExecUpstream(str(tmp_path / "exec.log"))
    listen = "127.0.0.1:%d" % free_port()
    port = int(listen.rsplit(":", 1)[1])
    pair = Pair(str(tmp_path), gate_cfg(listen, up.url, dbpath))
    rec = Recorder()
    events = []
    entries_seen = []
    t_start = time.monotonic()
    try:
        pair.start(0)
        pair.start(1)
        for c in range(CYCLES):
            fresh = ["k%d-c%02d-%03d" % (seed, c, i) for i in range(FRESH_KEYS)]
            done = sorted({a.key for a in rec.snapshot() if a.ok()})
            old = rng.sample(done, min(OLD_KEYS, len(done)))
            jobs = [k for i, k in enumerate(fresh) for _ in range(2 if i % 4 == 0 else 1)]
            jobs += old
            rng.shuffle(jobs)
            n0 = len(up.execs())
            err = []
            t = threading.Thread(target=lambda: _catch(err, killer, pair, up, rng, n0, events),
                                 daemon=True)
            t.start()
            run_cycle(port, jobs, rng, rec, "c%d" % c)
            t.join(30)
            assert not t.is_alive(), "the killer did not finish"
            assert not err, err
            # readable by another program after every kill, processes running
            entries_seen.append(mdb_check(dbpath))
        loop_s = time.monotonic() - t_start
        # a last SIGKILL of both, nothing in flight: the file as a crash
        # leaves it, read whole by lmdb-utils
        pair.kill([0, 1])
        entries = mdb_check(dbpath)
        t_last_kill = time.time()
        pair.start(0)
        pair.start(1)

        attempts = rec.snapshot()
        first_ok = {}
        for a in sorted(attempts, key=lambda a: a.t0):
            if a.ok() and a.key not in first_ok:
                first_ok[a.key] = a
        # every key that got a 2xx replays, byte for byte
        probe = Recorder()
        lost_records = []
        client = AttemptClient(ATTEMPT_TIMEOUT)
        try:
            for key, a in sorted(first_ok.items()):
                p = client.post(port, path_for(key), key, session="probe")
                probe(p)
                if not (p.ok() and p.replayed and p.body == a.body
                        and p.header("X-Exec") == a.header("X-Exec")):
                    lost_records.append((key, p))
        finally:
            client.close()
        execs = up.execs()
        rep = analyze(attempts + probe.snapshot(), execs)
        # the keys no client got a 2xx for: free again once their orphaned
        # locks expired (a new execution of such a key is allowed)
        never = sorted({a.key for a in attempts} - set(first_ok))
        time.sleep(max(0.0, t_last_kill + LOCK_SECONDS + 0.5 - time.time()))
        stuck = []
        client = AttemptClient(ATTEMPT_TIMEOUT)
        try:
            for key in never:
                p = session(client, [port], path_for(key), key,
                            Policy(attempt_timeout=ATTEMPT_TIMEOUT, budget=LOCK_SECONDS + 2),
                            rng, lambda a: None, sid="free")
                if not p.ok():
                    stuck.append((key, p))
        finally:
            client.close()
        both = sum(1 for e in events if len(e["which"]) == 2)
        print("lmdb kill loop: cycles=%d kills=%d (both=%d, one=%d) requests=%d keys=%d "
              "keys_2xx=%d kept_records=%d entries=%d (max after a cycle %d) duplicates=%d "
              "mismatched_replays=%d unexpected=%d lost_records=%d keys_without_2xx=%d "
              "freed_after_lock_seconds=%d errors=%s loop=%.0fs seed=%d"
              % (CYCLES, len(events), both, len(events) - both, rep.requests, rep.keys,
                 len(first_ok), len(first_ok) - len(lost_records), entries,
                 max(entries_seen), rep.duplicates, rep.mismatched, rep.unexpected,
                 len(lost_records), len(never), len(never) - len(stuck),
                 ",".join("%s:%d" % kv for kv in sorted(rep.errors.items())) or "-",
                 loop_s, seed))
        assert len(events) == CYCLES, events
        assert rep.duplicates == 0, rep.explain()
        assert rep.mismatched == 0, rep.explain()
        assert rep.unexpected == 0, rep.explain()
        assert lost_records == [], lost_records[:5]
        assert stuck == [], stuck[:5]
        # the storm reached the kills: requests were cut by them, and most
        # keys still got their answer
        assert rep.errors.get("disconnect", 0) > 0, rep.line()
        assert len(first_ok) > len(never), (len(first_ok), len(never))
        # the completed records are all in the file (locks of keys without
        # a 2xx may be there too)
        assert entries >= len(first_ok), (entries, len(first_ok))
    finally:
        pair.stop()
        up.stop()


def _catch(err, fn, *args):
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - reported by the test
        err.append(repr(e))
