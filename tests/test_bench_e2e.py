"""bench/e2e.py --quick on the CPU: our side end to end (llm-compressor skipped), the JSON has its fields."""
import json
import os
import sys
from pathlib import Path

import background

ROOT = Path(__file__).resolve().parents[1]


def _popen(work):
    scratch = work / "tmp"          # where its temporary scratch directory goes (TMPDIR)
    scratch.mkdir()
    return {"cwd": ROOT, "env": {**os.environ, "TMPDIR": str(scratch)}}


def prestart():
    """Started in the background once the session is collected (tests/background.py)."""
    background.start("e2e", lambda work: [sys.executable, str(ROOT / "bench" / "e2e.py"), "--quick", "--device",
                                          "cpu", "--no-llmc", "--out", str(work / "e2e.json")], popen=_popen)


def test_e2e_quick_ours_only():
    prestart()
    run = background.wait("e2e")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out, scratch = run.work / "e2e.json", run.work / "tmp"
    assert not list(scratch.glob("aq-e2e-*"))   # the benchmark cleans up after itself (torch may cache kernels there)
    r = json.loads(out.read_text())
    assert r["build"]["layers"] == 2 and r["llm_compressor"] is None
    ours = r["ours"]
    assert ours["seconds_end_to_end"] > 0 and ours["checkpoint_gib"] > 0
    assert len(ours["layers"]) == 2
    for row in ours["layers"]:
        for k in ("load", "forward", "hessian", "solve", "propagate", "write", "seconds"):
            assert row[k] is not None and row[k] >= 0, k
    assert "host_peak_gib" in ours["memory"]
    err = r["errors"]["ours"]
    assert len(err["local"]) == len(err["propagated"]) == 2
    assert all(0 < e < 1 for e in err["local"])
    s = r["summary"]
    assert s["ours_seconds"] == ours["seconds_end_to_end"] and "speedup" not in s
    md = out.with_suffix(".md").read_text()
    assert "bench/e2e.py" in md and "| layer |" in md
