"""scripts/check-layers: the repository passes, and a planted upward include
(a lower layer including a higher one's header) fails, naming the file."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SCRIPT = os.path.join(ROOT, "scripts", "check-layers")


def run(root):
    return subprocess.run([sys.executable, SCRIPT, root], capture_output=True, text=True,
                          timeout=60)


def test_repository_has_no_upward_include():
    r = run(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no upward include" in r.stdout


def copy_tree(tmp_path):
    for d in ("src", "include"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(tmp_path, d))
    return str(tmp_path)


def test_planted_upward_include_fails(tmp_path):
    root = copy_tree(tmp_path)
    path = os.path.join(root, "src", "idem", "engine.c")
    with open(path, "a") as f:
        f.write('\n#include "idemgate/proxy/exchange.h"\n')
    r = run(root)
    assert r.returncode == 1, r.stdout
    assert "src/idem/engine.c" in r.stdout and "idemgate/proxy/" in r.stdout


def test_header_in_core_including_config_fails(tmp_path):
    root = copy_tree(tmp_path)
    path = os.path.join(root, "include", "idemgate", "core", "buf.h")
    with open(path, "a") as f:
        f.write('\n#include "idemgate/config/config.h"\n')
    r = run(root)
    assert r.returncode == 1
    assert "include/idemgate/core/buf.h" in r.stdout


def test_same_layer_and_lower_includes_pass(tmp_path):
    root = copy_tree(tmp_path)
    path = os.path.join(root, "src", "store", "store.c")
    with open(path, "a") as f:
        f.write('\n#include "idemgate/idem/record.h"\n#include "idemgate/core/buf.h"\n')
    assert run(root).returncode == 0


def test_file_outside_a_layer_folder_fails(tmp_path):
    root = copy_tree(tmp_path)
    with open(os.path.join(root, "src", "stray.c"), "w") as f:
        f.write("int x;\n")
    r = run(root)
    assert r.returncode == 1 and "src/stray.c" in r.stdout
