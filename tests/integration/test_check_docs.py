"""scripts/check-docs: docs/ and the code's own tables (the option tables,
the error table, METRICS(X), OUTCOMES(X)) agree, and a drift in either
direction fails, naming what drifted: something in the code but not in
the docs, or in the docs but not in the code."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SCRIPT = os.path.join(ROOT, "scripts", "check-docs")


def run(root):
    return subprocess.run([sys.executable, SCRIPT, root], capture_output=True, text=True,
                          timeout=60)


def copy_tree(tmp_path):
    for d in ("src", "include", "docs"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(tmp_path, d))
    return str(tmp_path)


def edit(root, rel, old, new):
    path = os.path.join(root, rel)
    with open(path) as f:
        text = f.read()
    assert old in text, (rel, old)
    with open(path, "w") as f:
        f.write(text.replace(old, new, 1))


def drops_line(root, rel, needle):
    path = os.path.join(root, rel)
    with open(path) as f:
        lines = f.readlines()
    kept = [ln for ln in lines if needle not in ln]
    assert len(kept) == len(lines) - 1, (rel, needle)
    with open(path, "w") as f:
        f.writelines(kept)


def fails_with(root, *needles):
    r = run(root)
    assert r.returncode == 1, r.stdout + r.stderr
    for n in needles:
        assert n in r.stdout, (n, r.stdout)


def test_repository_docs_match_the_code():
    r = run(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "docs/ matches the code" in r.stdout


# -- in the code, not in the docs -------------------------------------------

def test_metric_added_in_code_only(tmp_path):
    root = copy_tree(tmp_path)
    edit(root, "include/idemgate/core/metrics.h",
         '    X(M_LOCK_RENEWALS, COUNTER,',
         '    X(M_PLANTED, COUNTER, ALWAYS, "idemgate_planted_total", NONE, "Planted.")      \\\n'
         '    X(M_LOCK_RENEWALS, COUNTER,')
    fails_with(root, "metric idemgate_planted_total (in METRICS(X)) is not documented")


def test_option_added_in_code_only(tmp_path):
    root = copy_tree(tmp_path)
    edit(root, "src/config/options.c",
         'O_INT(struct cfg_redis, wait_replicas, 0, 64, "0"),',
         'O_INT(struct cfg_redis, wait_replicas, 0, 64, "0"),\n'
         '    O_INT(struct cfg_redis, planted_ms, 0, 10, "5"),')
    fails_with(root, "key redis.planted_ms (in the code) is not documented")


def test_error_added_in_code_only(tmp_path):
    root = copy_tree(tmp_path)
    edit(root, "src/core/errors.c",
         '[ERR_BAD_REQUEST] = {400, "invalid_request_error", "bad_request"',
         '[ERR_BAD_REQUEST] = {418, "invalid_request_error", "bad_request"')
    fails_with(root, "bad_request (status 418, type invalid_request_error; in the code) "
               "is not documented",
               "bad_request (status 400, type invalid_request_error) is not in the code")


def test_outcome_added_in_code_only(tmp_path):
    root = copy_tree(tmp_path)
    edit(root, "include/idemgate/core/metrics.h",
         '    X(OUT_REPLAYED, "replayed")',
         '    X(OUT_PLANTED, "planted")                                                      \\\n'
         '    X(OUT_REPLAYED, "replayed")')
    fails_with(root, "outcome planted (in OUTCOMES) is not documented")


def test_env_var_and_flag_added_in_code_only(tmp_path):
    root = copy_tree(tmp_path)
    edit(root, "src/config/options.c", '{"IDEMGATE_LOG_LEVEL", "log", "level", 0},',
         '{"IDEMGATE_LOG_LEVEL", "log", "level", 0},\n    {"IDEMGATE_PLANTED", "log", '
         '"access", 0},')
    edit(root, "src/main.c", '{"version", no_argument, NULL, OPT_VERSION},',
         '{"version", no_argument, NULL, OPT_VERSION},\n    {"planted", no_argument, NULL, 1},')
    fails_with(root, "IDEMGATE_PLANTED (sets log.access in the code) is missing",
               "flag --planted (in src/main.c) is not documented")


def test_default_changed_in_code_only(tmp_path):
    root = copy_tree(tmp_path)
    edit(root, "src/config/options.c", 'lock_seconds, 1, 86400, "30")',
         'lock_seconds, 1, 86400, "31")')
    fails_with(root, "idempotency.lock_seconds: default `30`, the code has '31'")


def test_metric_help_changed_in_code_only(tmp_path):
    root = copy_tree(tmp_path)
    edit(root, "include/idemgate/core/metrics.h", '"Lock renewals that succeeded."',
         '"Lock renewals."')
    fails_with(root, "idemgate_lock_renewals_total: help")


# -- in the docs, not in the code -------------------------------------------

def test_metric_documented_but_not_in_code(tmp_path):
    root = copy_tree(tmp_path)
    drops_line(root, "include/idemgate/core/metrics.h", '"idemgate_store_failopen_total"')
    drops_line(root, "include/idemgate/core/metrics.h",
               '"Requests forwarded without idempotency because the store failed')
    fails_with(root, "metric idemgate_store_failopen_total is not in METRICS(X)")


def test_key_documented_but_not_in_code(tmp_path):
    root = copy_tree(tmp_path)
    drops_line(root, "src/config/options.c", "wait_replicas, 0, 64")
    fails_with(root, "key redis.wait_replicas is not in the code's option tables")


def test_error_and_outcome_documented_but_not_in_code(tmp_path):
    root = copy_tree(tmp_path)
    drops_line(root, "include/idemgate/core/metrics.h", 'X(OUT_MISMATCH, "mismatch")')
    edit(root, "docs/errors.md", "| `upstream_timeout` | 504 |",
         "| `planted_code` | 599 | `api_error` | never |\n| `upstream_timeout` | 504 |")
    fails_with(root, "outcome mismatch is not in OUTCOMES",
               "planted_code (status 599, type api_error) is not in the code's error table")


def test_state_documented_but_not_in_code(tmp_path):
    root = copy_tree(tmp_path)
    drops_line(root, "include/idemgate/proxy/client.h", 'X(CLIENT_HOLDING, "holding")')
    fails_with(root, "state holding of idemgate_client_connections is not in the code")


def test_missing_table_fails(tmp_path):
    root = copy_tree(tmp_path)
    os.remove(os.path.join(root, "docs", "outcomes.md"))
    fails_with(root, "docs/outcomes.md: missing")
