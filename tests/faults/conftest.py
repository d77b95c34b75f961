"""pytest fixtures for the fault suite (tests/faults). The integration
suite's fixtures (idemgate factory, redis, upstream) are imported from
tests/integration/conftest.py, not copied; this file adds the
execution-logging upstream (faultlib.ExecUpstream) and a hard per-test
timeout (SIGALRM: a hung case fails, it does not hang ctest)."""

import importlib.util
import os
import signal
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import faultlib  # noqa: E402  (puts tests/integration on sys.path)

_spec = importlib.util.spec_from_file_location(
    "integration_conftest", os.path.join(faultlib.INTEGRATION, "conftest.py"))
_ig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ig)

idemgate = _ig.idemgate
redis = _ig.redis

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


@pytest.fixture
def execup(tmp_path):
    """Factory: execup(nports=1) starts execup.py logging to a file in
    tmp_path; every one started is stopped at teardown."""
    started = []

    def factory(nports=1):
        up = faultlib.ExecUpstream(str(tmp_path / ("exec-%d.log" % len(started))), nports)
        started.append(up)
        return up

    yield factory
    for up in started:
        up.stop()
