"""pytest configuration of the fault suite (tests/faults): puts tests/lib on
sys.path, offers the shared fixtures of idemtest.fixtures (idemgate, redis,
execup: the execution-logging upstream) and a hard per-test timeout
(SIGALRM: a hung case fails, it does not hang ctest)."""

import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from idemtest.fixtures import execup, idemgate, redis  # noqa: E402,F401

# Every case ends within this many seconds or fails (override per test with
# @pytest.mark.hard_timeout(N)).
HARD_TIMEOUT = 90


def pytest_configure(config):
    config.addinivalue_line("markers", "hard_timeout(seconds): the case's hard time limit")


@pytest.fixture(autouse=True)
def hard_timeout(request):
    m = request.node.get_closest_marker("hard_timeout")
    limit = m.args[0] if m else HARD_TIMEOUT

    def expired(signum, frame):
        raise TimeoutError("fault case exceeded its hard timeout of %ss" % limit)

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
