"""Run a test file's `__main__` block under Triton's CPU interpreter, in a subprocess (the interpreter is chosen
when Triton is imported, so it cannot be switched on inside the pytest process)."""
import os
import subprocess
import sys


def run_under_triton_interpreter(test_file: str) -> str:
    """stdout of `python test_file` with TRITON_INTERPRET=1 and no visible GPU; asserts it exits 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout
