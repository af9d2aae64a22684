"""bench/quality.py --quick: the CI smoke run of the quality benchmark (demo/olmoe-tiny, W3 g64, 2 seeds).

Checks the JSON it writes (fields, one fp row, RTN once, GPTQ once per seed, the summary's mean and
spread), that GPTQ's perplexity gap to fp is below round-to-nearest's on average over the seeds, and
that its scratch directory is gone afterwards. No timing is asserted.
"""
import json
import os
import re
import sys
from pathlib import Path

import background

ROOT = Path(__file__).resolve().parents[1]


def prestart():
    """Started in the background once the session is collected (tests/background.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    background.start("quality", lambda work: [sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--out",
                                              str(work / "quality.json")],
                     popen=lambda work: {"cwd": work, "env": env})


def test_quick_run():
    prestart()
    r = background.wait("quality")
    out = r.work / "quality.json"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("command", "models", "formats", "methods", "seeds", "rows", "summary", "averages", "fp", "defaults"):
        assert key in res, key
    assert res["quick"] and res["seeds"] == [0, 1] and res["formats"] == ["w3g64"]
    rows = res["rows"]
    assert [r["method"] for r in rows].count("fp") == 1
    assert [r["method"] for r in rows].count("rtn") == 1
    assert sorted(r["seed"] for r in rows if r["method"] == "gptq") == [0, 1]
    summary = {s["method"]: s for s in res["summary"]}
    fp = res["fp"]["olmoe"]
    gaps = [r["ppl"] - fp for r in rows if r["method"] == "gptq"]
    assert abs(summary["gptq"]["gap_mean"] - sum(gaps) / 2) < 1e-9
    assert summary["gptq"]["gap_min"] == min(gaps) and summary["gptq"]["gap_max"] == max(gaps)
    assert summary["gptq"]["gap_mean"] < summary["rtn"]["gap_mean"], summary
    assert "| w3g64 | gptq |" in r.stdout and out.with_suffix(".md").is_file()
    scratch = re.search(r"removed the scratch directory (\S+)", r.stdout)
    assert scratch and not Path(scratch.group(1)).exists()
