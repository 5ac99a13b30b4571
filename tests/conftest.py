"""Shared fixtures: run the scripts as a user would, in a scratch folder."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
REFERENCE = os.path.join(TESTS, "reference")  # data produced by running the original implementation


def run_script(script, *args, cwd, check=True, timeout=600, env_extra=None):
    """Run ROOT/script with args in cwd (user modules from tests/ and the root on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT])
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(env_extra or {})
    cmd = [sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


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
