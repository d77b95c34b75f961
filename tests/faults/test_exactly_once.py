"""The exactly-once checker (exactly_once.py) in a short configuration for
ctest: 40 s of load from 12 clients on two instances with every fault
(Redis paused and restarted empty, an instance SIGKILLed, the upstream slow
and cutting answers), about a minute in all; then 12 s behind upstream
groups of two servers, one of them SIGKILLed and back 2 s later (about
15 s); then the LMDB variant: two processes on one LMDB path and one
listen address, no Redis, one of them SIGKILLed and started again on the
same path mid-run, the upstream slow and cutting answers (about 40 s).
Longer runs: make soak, or exactly_once.py
--duration/--clients/--keys/--faults/--upstreams/--store."""

import os
import subprocess

import pytest

from idemtest.procs import FAULTS, PYTHON, idemgate_bin


def run_checker(args, timeout):
    cmd = [PYTHON, os.path.join(FAULTS, "exactly_once.py"), "--bin", idemgate_bin()] + args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    lines = p.stdout.strip().splitlines()
    print(p.stderr[-4000:])
    print("\n".join(lines))
    assert lines and lines[-1].startswith("exactly-once: "), (p.stdout, p.stderr[-4000:])
    assert p.returncode == 0, lines[-1] + "\n" + p.stderr[-4000:]
    return lines


@pytest.mark.hard_timeout(200)
def test_exactly_once_under_faults():
    run_checker(["--duration", "40", "--clients", "12", "--faults", "all", "--seed", "8"], 180)


@pytest.mark.hard_timeout(90)
def test_exactly_once_upstream_group_kill():
    """Two execup.py servers per instance's group; the one killed at 6 s:
    what it never received goes to the other (safe_retries), what it was
    sent is not sent again."""
    lines = run_checker(["--duration", "12", "--clients", "6", "--upstreams", "2",
                         "--faults", "upstream_kill", "--seed", "9"], 75)
    assert " faults=upstream_kill:1 " in lines[-1], lines[-1]
    retries = [ln for ln in lines if ln.startswith("upstream_group: safe_retries=")]
    # fail_timeout_ms 500: the killed server is tried, refuses, and the
    # request goes to the other, several times in its 2 s away.
    assert retries and int(retries[0].rpartition("=")[2]) > 0, lines


@pytest.mark.hard_timeout(120)
def test_exactly_once_lmdb_two_processes_one_address():
    """--store lmdb: both instances on one LMDB path and one address; about
    10 s in (after the slow upstream's 6 s) one is SIGKILLed and started again 1 s later on the same path.
    Its in-flight keys keep their locks (409 until lock_seconds 30, longer
    than the clients try); nothing executes twice, every 2xx is its key's
    one execution, and both serve at the end."""
    lines = run_checker(["--store", "lmdb", "--duration", "20", "--clients", "8",
                         "--faults", "idemgate_kill,upstream_slow,upstream_cut",
                         "--seed", "19"], 100)
    assert " store=lmdb " in lines[-1], lines[-1]
    assert " faults=idemgate_kill:1," in lines[-1], lines[-1]
    assert " duplicates=0 " in lines[-1], lines[-1]
