"""The fast lane (`make test-fast`, `-m "not e2e and not slow"`) starts no server.

A `pytest --co -m "not e2e"` of the whole suite in a subprocess, with a probe plugin that finds what
starts a server on its own, without the marks: every fixture or test function that reaches one of
conftest's SERVER_STARTERS through the functions and classes of tests/ it names. No test left after
`-m "not e2e"` may use such a fixture or be such a test, conftest's SERVER_FIXTURES must name every
one of conftest.py's own, and the e2e side must hold the server tests. Collection only: ~10 s, and
in the fast lane itself, which it guards. Behind it, tests.server_process refuses to start a server for
a test not marked e2e, whichever lane runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ray_cluster, server_process

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import inspect, json, os, types
from pathlib import Path

import pytest

TESTS = Path(os.environ["LANE_PROBE_TESTS"])
seen = {"deselected": []}


def _names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _ours(obj):
    try:
        return TESTS in Path(inspect.getfile(obj)).resolve().parents
    except TypeError:
        return False


def reaches(func, starters, memo):
    """Whether `func` names a starter, itself or through the tests/ functions and classes it names."""
    code = getattr(func, "__code__", None)
    if code is None or code in memo:
        return memo.get(code, False)
    memo[code] = False
    names = _names(code)
    found = bool(names & starters)
    for name in names - starters:
        if found:
            break
        obj = func.__globals__.get(name)
        if inspect.isfunction(obj) and _ours(obj):
            found = reaches(obj, starters, memo)
        elif inspect.isclass(obj) and _ours(obj):
            found = any(reaches(f, starters, memo) for f in vars(obj).values() if inspect.isfunction(f))
    memo[code] = found
    return found


def pytest_deselected(items):
    seen["deselected"] += [item.nodeid for item in items]


@pytest.hookimpl(wrapper=True)   # around every other implementation: sees the items before `-m` deselects
def pytest_collection_modifyitems(session, items):
    seen["fixturedefs"] = {(name, fixturedef.baseid): fixturedef.func for item in items
                           for name, defs in item._fixtureinfo.name2fixturedefs.items() for fixturedef in defs}
    return (yield)


def pytest_collection_finish(session):
    conftest = next(p for p in session.config.pluginmanager.get_plugins()
                    if getattr(p, "__file__", None) and Path(p.__file__).resolve() == TESTS / "conftest.py")
    starters, memo = frozenset(conftest.SERVER_STARTERS), {}
    server_fixtures, conftest_server_fixtures = set(), set()
    for (name, _), func in seen.pop("fixturedefs").items():
        if reaches(func, starters, memo):
            server_fixtures.add(name)
            if Path(inspect.getfile(func)).resolve() == TESTS / "conftest.py":
                conftest_server_fixtures.add(name)
    seen.update(
        server_fixtures=sorted(server_fixtures), conftest_server_fixtures=sorted(conftest_server_fixtures),
        listed=sorted(conftest.SERVER_FIXTURES),
        selected=[{"id": item.nodeid, "fixtures": sorted(set(item.fixturenames) & server_fixtures),
                   "starts": reaches(item.function, starters, memo)} for item in session.items])
    Path(os.environ["LANE_PROBE_OUT"]).write_text(json.dumps(seen))
'''


def test_no_test_outside_e2e_starts_a_server(tmp_path):
    (tmp_path / "lane_probe.py").write_text(PROBE)
    out = tmp_path / "lanes.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LANE_PROBE_OUT": str(out), "LANE_PROBE_TESTS": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-p", "lane_probe",
                           "-m", "not e2e", "tests"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lanes = json.loads(out.read_text())

    # The probe finds the servers by itself: the session's pool, Ray, and a module's own (test_architecture_http.py).
    assert {"server_pool", "ray_server", "arch_server"} <= set(lanes["server_fixtures"]), lanes["server_fixtures"]
    missing = set(lanes["conftest_server_fixtures"]) - set(lanes["listed"])
    assert not missing, f"conftest.py fixtures that start a server, missing from SERVER_FIXTURES: {missing}"

    unmarked = [(t["id"], t["fixtures"] or "starts one itself") for t in lanes["selected"] if t["fixtures"] or t["starts"]]
    assert not unmarked, f"start a server but are not marked e2e: {unmarked}"

    deselected = set(lanes["deselected"])
    assert any(i.startswith("tests/test_server.py::") for i in deselected), "the hook marked no server test e2e"
    assert any(i.startswith("tests/test_http_ray.py::") for i in deselected)
    assert any("[ray]" in i for i in deselected)            # `target`'s Ray parameter (conftest.py)
    assert "tests/test_architecture_http.py::test_greedy_over_http_matches_transformers_and_peft[gemma3]" in deselected
    kept = {t["id"] for t in lanes["selected"]}
    assert "tests/test_architecture_http.py::test_unsupported_checkpoint_is_refused_in_one_line" in kept
    assert any(i.startswith("tests/test_kernels.py::") for i in kept)


def test_a_test_not_marked_e2e_cannot_start_a_server(request, tmp_path):
    # The starters by their names as strings: naming them in code would mark this test e2e (conftest.py).
    assert request.node.get_closest_marker("e2e") is None
    with pytest.raises(RuntimeError, match="is not marked e2e"):
        getattr(server_process, "start_server")(tmp_path)  # noqa: B009
    assert not list(tmp_path.iterdir()), "refused before anything started"
    assert "refuse_unless_e2e" in getattr(ray_cluster, "start_ray_server").__code__.co_names  # noqa: B009
