"""`python train_quant.py ...` (or `python -c SCRIPT ...`) in a fresh process that skips the ~7 s of imports.

Tests that SIGKILL, SIGTERM or SIGINT a run, or check its exit code and output, need a real process per run; on
2 CPU cores most of such a process's time is importing torch, lightning and transformers. A zygote process does
those imports once (with the environment the tests ran these processes with: OMP_NUM_THREADS=1 and the repository
on PYTHONPATH) and then forks one child per run, before any torch op has run. The child is a process of its own
(its own pid, signals, exit status, stdout and stderr files): it changes into the run's directory, takes the run's
extra environment, runs the script as __main__ with the run's argv and ends the way the interpreter would (an
uncaught exception's traceback on stderr and exit 1, SystemExit's code, KeyboardInterrupt as a death by SIGINT,
threads joined and atexit handlers run, then the streams flushed).

`run(...)` returns what `subprocess.run(..., capture_output=True, text=True)` would: returncode (-N for a death
by signal N), stdout, stderr.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent

# The modules a run imports that take the time (imported by the zygote before it forks).
PRELOAD = ["torch", "torch._dynamo", "lightning", "transformers", "safetensors.torch", "matplotlib.pyplot",
           "alphaquant.app", "alphaquant.api", "alphaquant.pipeline.session", "alphaquant.pipeline.trainer",
           "alphaquant.pipeline.resume", "alphaquant.export", "alphaquant.data", "alphaquant.pipeline.calibrate",
           "alphaquant.pipeline.walker", "alphaquant.callbacks.solve", "alphaquant.callbacks.hessian", "alphaquant.arch"]

ZYGOTE = r"""
import importlib, json, os, sys
proto_in = os.fdopen(int(sys.argv[1]), "r")
proto_out = os.fdopen(int(sys.argv[2]), "w")
for name in sys.argv[3:]:
    importlib.import_module(name)
proto_out.write("ready\n"); proto_out.flush()


def child(req):
    import atexit, runpy, signal, threading, traceback
    proto_in.close(); proto_out.close()
    os.chdir(req["cwd"])
    os.environ.update(req["env"])
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for n, path in ((1, req["stdout"]), (2, req["stderr"])):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, n)
        os.close(fd)
    code = 0
    try:
        try:
            if req["script"] is None:
                sys.argv = [req["path"], *req["argv"]]
                sys.path[0] = os.path.dirname(req["path"])
                runpy.run_path(req["path"], run_name="__main__")
            else:
                sys.argv = ["-c", *req["argv"]]
                sys.path[0] = ""
                exec(compile(req["script"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()
        atexit._run_exitfuncs()
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
    finally:
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


for line in proto_in:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(req)
    proto_out.write(json.dumps({"pid": pid}) + "\n"); proto_out.flush()
    _, status = os.waitpid(pid, 0)
    proto_out.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n"); proto_out.flush()
"""

_lock = threading.Lock()
_zygote: SimpleNamespace | None = None


def _start() -> SimpleNamespace:
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(to_r), str(from_w), *PRELOAD], cwd=REPO, env=env,
                            pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL)
    os.close(to_r)
    os.close(from_w)
    z = SimpleNamespace(proc=proc, send=os.fdopen(to_w, "w"), recv=os.fdopen(from_r, "r"))
    if z.recv.readline().strip() != "ready":
        raise RuntimeError(f"the zygote process failed to start (exit {proc.wait()})")
    atexit.register(_stop, z)
    return z


def _stop(z: SimpleNamespace) -> None:
    z.send.close()
    try:
        z.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        z.proc.kill()
        z.proc.wait()


def run(argv, *, cwd: Path, script: str | None = None, env_extra: dict | None = None, timeout: float = 600):
    """`python train_quant.py *argv` (or `python -c script *argv`) in cwd with env_extra added to the environment."""
    global _zygote
    with _lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = _start()
        z = _zygote
        with tempfile.TemporaryDirectory() as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            req = {"argv": [str(a) for a in argv], "script": script, "path": str(REPO / "train_quant.py"),
                   "cwd": str(cwd), "env": {k: str(v) for k, v in (env_extra or {}).items()},
                   "stdout": str(out), "stderr": str(err)}
            z.send.write(json.dumps(req) + "\n")
            z.send.flush()
            pid = json.loads(z.recv.readline())["pid"]
            timer = threading.Timer(timeout, lambda: os.kill(pid, 9))
            timer.start()
            try:
                code = json.loads(z.recv.readline())["returncode"]
            finally:
                timer.cancel()
            return SimpleNamespace(returncode=code, stdout=out.read_text(), stderr=err.read_text())
