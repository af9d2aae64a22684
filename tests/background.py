"""Subprocess-only tests started early, in the background (CI has 2 cores and most tests keep one busy).

A test module that defines `prestart()` has it called once the session's tests are collected (conftest.py); it
starts its subprocess with `start(...)`, and the test itself calls `wait(...)` for that same process and then checks
its output as before. Run alone, the test starts it at its own call (`start` is idempotent). Processes a session
never waits for are killed when it ends.
"""
from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

_jobs: dict[str, SimpleNamespace] = {}


def start(key: str, make_cmd, popen=lambda work: {}) -> SimpleNamespace:
    """make_cmd(workdir) -> argv and popen(workdir) -> Popen's keywords (cwd, env), with workdir a fresh directory
    of this job's own; started once per key."""
    if key not in _jobs:
        work = Path(tempfile.mkdtemp(prefix=f"aq-test-{key}-"))
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(make_cmd(work), stdout=out, stderr=err, text=True, **popen(work))
        _jobs[key] = SimpleNamespace(proc=proc, out=out, err=err, work=work)
    return _jobs[key]


def wait(key: str, timeout: float = 600) -> SimpleNamespace:
    """(returncode, stdout, stderr, work) of the job, once it has ended (killed after timeout)."""
    job = _jobs[key]
    try:
        job.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.proc.kill()
        job.proc.wait()
    job.out.seek(0)
    job.err.seek(0)
    return SimpleNamespace(returncode=job.proc.returncode, stdout=job.out.read(), stderr=job.err.read(),
                           work=job.work)


def _stop_all():
    for job in _jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()
        shutil.rmtree(job.work, ignore_errors=True)


atexit.register(_stop_all)
