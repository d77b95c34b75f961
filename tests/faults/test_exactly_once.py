"""The exactly-once checker (exactly_once.py) in a short configuration for
ctest: 40 s of load from 12 clients on two instances with every fault
(Redis paused and restarted empty, an instance SIGKILLed, the upstream slow
and cutting answers), about a minute in all. Longer runs: make soak, or
exactly_once.py --duration/--clients/--keys/--faults."""

import os
import subprocess

import pytest

from idemtest.procs import FAULTS, PYTHON, idemgate_bin


@pytest.mark.hard_timeout(200)
def test_exactly_once_under_faults():
    cmd = [PYTHON, os.path.join(FAULTS, "exactly_once.py"),
           "--bin", idemgate_bin(), "--duration", "40", "--clients", "12",
           "--faults", "all", "--seed", "8"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    lines = p.stdout.strip().splitlines()
    print(p.stderr[-4000:])
    print("\n".join(lines))
    assert lines and lines[-1].startswith("exactly-once: "), (p.stdout, p.stderr[-4000:])
    assert p.returncode == 0, lines[-1] + "\n" + p.stderr[-4000:]
