"""Shared fixtures: run the scripts as a user would, in a scratch folder."""
import os
import subprocess
import sys

import pytest

import fork_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
REFERENCE = os.path.join(TESTS, "reference")  # data produced by running the original implementation


def run_script(script, *args, cwd, check=True, timeout=600, env_extra=None, fresh=False):
    """Run ROOT/script with args in cwd (user modules from tests/ and the root on the path), through the
    shared fork server (tests/fork_server.py), or in a fresh interpreter when fresh or env_extra is given."""
    if fresh or env_extra:
        env = fork_server.script_env()
        env.update(env_extra or {})
        cmd = [sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args]
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        result = fork_server.shared().run(script, args, cwd=cwd, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def pytest_sessionfinish(session, exitstatus):
    fork_server.close_shared()


@pytest.fixture
def run(tmp_path):
    """run(script, *args, check=True) in a scratch folder; returns CompletedProcess."""

    def _run(script, *args, **kwargs):
        kwargs.setdefault("cwd", tmp_path)
        return run_script(script, *args, **kwargs)

    return _run


@pytest.fixture(scope="session")
def reference_dir():
    if not os.path.isdir(REFERENCE):
        pytest.fail(f"reference data not found at {REFERENCE}; it is part of the repository")
    return REFERENCE
