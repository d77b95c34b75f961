"""pytest configuration of the integration suite: puts tests/lib on sys.path
and offers the shared fixtures of idemtest.fixtures (upstream, upstream2,
redis, redis_servers, redis_tls, redis_tls_servers, store_cfg, proto, idemgate).
Helpers are in the idemtest package (tests/lib/idemtest: `from idemtest.http import request`,
...)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from idemtest.fixtures import (idemgate, redis, redis_servers,  # noqa: E402,F401
                               proto, redis_tls, redis_tls_servers,
                               store_cfg, upstream, upstream2)
