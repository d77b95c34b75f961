"""idemgate configurations as the tests build them (plain dicts, written to a
file by procs.Idemgate).

Owns: merge() (deep merge), gate_config() (store + upstream + idempotency +
top-level settings), store_config() and STORES (the store_cfg fixture runs
a test on each).
"""

import copy


def merge(base, over):
    """Deep merge of dicts (over wins); returns a new dict."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def gate_config(store_cfg, upstream_url, idem=None, **top):
    cfg = merge({"upstream": upstream_url}, store_cfg)
    if idem:
        cfg = merge(cfg, {"idempotency": idem})
    return merge(cfg, top)


def store_config(kind, redis):
    """The store settings for kind "memory" or "redis" (on that Redis)."""
    if kind == "redis":
        return {"store": "redis", "redis": {"url": redis.url}}
    return {"store": "memory"}


STORES = ["memory", "redis"]
