"""Quality gates of the test suite itself: self-contained, registered markers, collected doctests."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What the tests, examples, benchmarks, the Kubernetes e2e and CI run; none of it may reach outside the repository.
SCANNED = ("tests", "examples", "benchmarks", "infra", "Dockerfile", "Makefile", ".ci")

#: Paths outside a clone: the sibling ``shared`` folder of the development machine, and any
#: absolute path into its ``/work``. Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([
    re.escape(".." + "/shared"),
    re.escape("/work" + "/shared"),
    r"(?:^|[\s\"'(=,])" + re.escape("/" + "work/"),
]))


def _files(names=SCANNED):
    for name in names:
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            yield path
        for base, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".pytest")]
            for f in files:
                if not f.endswith((".pyc", ".pyo")):
                    yield os.path.join(base, f)


def test_nothing_refers_to_a_path_outside_the_repository():
    hits = []
    for path in _files():
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:  # a binary file: nothing it could run
            continue
        hits += [f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}"
                 for i, line in enumerate(lines, 1) if OUTSIDE.search(line)]
    assert not hits, "paths outside the repository (a fresh clone has none of them):\n" + "\n".join(hits)


def test_the_scan_finds_what_it_forbids():
    """The pattern above matches the forms it is meant to catch, and not the repository's own paths."""
    for bad in ('CHECK = "..' + '/shared/check.py"',
                "python /work" + "/shared/check.py",
                "open('/" + "work/main/x')"):
        assert OUTSIDE.search(bad), bad
    for fine in ('f"{s3_bucket}/work/patterns.zarr"', '"$OUT/work/$ID/maps.zarr"', "shared/DESIGN.md"):
        assert not OUTSIDE.search(fine), fine


def test_test_modules_do_not_import_each_other():
    """Shared builders live in tests/_builders.py; a test module is never imported as a library."""
    offenders = []
    for path in _files(["tests"]):
        if not path.endswith(".py"):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{os.path.relpath(path, ROOT)}:{node.lineno}: {n}" for n in names
                          if n.split(".")[0].startswith("test_") or n.split(".")[0] == "conftest"]
    assert not offenders, "import from tests/_builders.py instead:\n" + "\n".join(offenders)


def test_markers_are_registered_and_strict():
    res = subprocess.run([sys.executable, "-m", "pytest", "--markers", "-p", "no:cacheprovider"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    listed = set(re.findall(r"^@pytest\.mark\.(\w+):", res.stdout, re.M))
    assert {"slow", "s3", "postgres", "gpu"} <= listed, sorted(listed)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in ini["addopts"].split()


def test_doctests_of_the_package_are_collected():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert {"tests", "xrdscale"} <= set(ini["testpaths"])
    assert "--doctest-modules" in ini["addopts"].split()


@pytest.mark.parametrize("flag", ["NORMALIZE_WHITESPACE", "ELLIPSIS", "NUMBER"])
def test_doctest_option_flags(flag):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert flag in ini["doctest_optionflags"].split()
