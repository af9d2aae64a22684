"""Run a test file's `__main__` block under Triton's CPU interpreter, in a subprocess (the interpreter is chosen
when Triton is imported, so it cannot be switched on inside the pytest process).

The interpreter runs one Python thread each; on CI's 2 cores the session's interpreter runs are started together
at the first one asked for (conftest.py lists those the session selected), so that they overlap with each other
and with the tests in between instead of running one after another. Each test still waits for, and checks, its
own file's run.
"""
import atexit
import os
import subprocess
import sys
import tempfile

PENDING: list[str] = []
"""Test files whose interpreter run this session will ask for (set by conftest.py after collection)."""

_running: dict[str, tuple[subprocess.Popen, object, object]] = {}


def _start(test_file: str):
    root = os.path.dirname(os.path.dirname(test_file))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")    # files: no pipe fills up meanwhile
    return subprocess.Popen([sys.executable, test_file], env=env, stdout=out, stderr=err, text=True), out, err


def _stop_all():
    for proc, _, _ in _running.values():
        proc.kill()
        proc.wait()


atexit.register(_stop_all)


def run_under_triton_interpreter(test_file: str) -> str:
    """stdout of `python test_file` with TRITON_INTERPRET=1 and no visible GPU; asserts it exits 0."""
    test_file = os.path.abspath(test_file)
    if test_file not in _running:
        for f in [test_file, *PENDING]:
            if f not in _running:
                _running[f] = _start(f)
        PENDING.clear()
    proc, out, err = _running.pop(test_file)
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout
