"""bench/trace_report.py on a hand-made timeline whose idle times are worked out by hand below."""
import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import trace_report  # noqa: E402


def _events():
    ev = []

    def x(name, cat, ts, dur, tid=1, **args):
        ev.append({"ph": "X", "pid": 1, "tid": tid, "name": name, "cat": cat, "ts": ts, "dur": dur, "args": args})
    # one collect pass [0, 1000) holding range A [0, 600) with B [450, 550) inside; a propagate pass [1000, 1500)
    x("pass:collect:calib:g0", "user_annotation", 0, 1000)
    x("aq:A", "user_annotation", 0, 600)
    x("aq:B", "user_annotation", 450, 100)
    x("aten::mm", "cpu_op", 10, 100)
    x("cudaLaunchKernel", "cuda_runtime", 50, 5, correlation=1)
    x("gemm", "kernel", 100, 300, tid=7, correlation=1)          # GPU busy [100, 400)
    x("aten::copy_", "cpu_op", 500, 200)
    x("cudaLaunchKernel", "cuda_runtime", 690, 5, correlation=2)
    x("copyk", "kernel", 700, 200, tid=7, correlation=2)         # GPU busy [700, 900)
    x("pass:propagate:calib:g", "user_annotation", 1000, 500)
    return ev


def test_idle_time_by_pass_range_and_host_op(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _events()}, f)
    r = trace_report.report(trace_report.load(path))
    # idle stretches: [0, 100), [400, 700), [900, 1500) -> 1000 us of 1500
    assert r["gpu_busy_s"] == pytest.approx(500e-6) and r["gpu_idle_s"] == pytest.approx(1000e-6)
    collect, prop = r["passes"]
    assert (collect["gpu_ms"], collect["kernels"], prop["kernels"]) == (pytest.approx(0.5), 2, 0)
    assert collect["gpu_idle_ms"] == pytest.approx(0.5) and prop["gpu_idle_ms"] == pytest.approx(0.5)
    # innermost range: A over [0,100) [400,450) [550,600); B over [450,550); the pass over [600,700) [900,1000);
    # the propagate pass over [1000,1500)
    by_range = r["idle_by_range_ms"]
    assert by_range["aq:A"] == pytest.approx(0.2) and by_range["aq:B"] == pytest.approx(0.1)
    assert by_range["pass:collect:calib"] == pytest.approx(0.2)
    assert by_range["pass:propagate:calib"] == pytest.approx(0.5)
    # outermost host op: mm over [10,100), copy_ over [500,700), nothing else on the main thread
    ops = r["idle_by_host_op_ms"]
    assert ops["aten::mm"] == pytest.approx(0.09) and ops["aten::copy_"] == pytest.approx(0.2)
    assert ops["python (no op on the main thread)"] == pytest.approx(1.0 - 0.09 - 0.2)
    assert r["largest_gaps"][0]["ms"] == pytest.approx(0.6)
    # GPU time by launch site: gemm launched at 50 (range A, inside aten::mm), copyk at 690 (only the pass's range
    # is open there, inside aten::copy_)
    assert r["gpu_by_range_ms"] == {"aq:A": pytest.approx(0.3), "pass:collect:calib": pytest.approx(0.2)}
    assert r["gpu_by_site_ms"] == {"aq:A / aten::mm": pytest.approx(0.3),
                                   "pass:collect:calib / aten::copy_": pytest.approx(0.2)}


def test_a_trace_without_pass_ranges_is_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"ph": "X", "name": "k", "cat": "kernel", "ts": 0, "dur": 1, "tid": 7}]))
    with pytest.raises(SystemExit, match="no pass: ranges"):
        trace_report.report(trace_report.load(path))


def test_a_window_of_layers_is_reported_per_layer():
    """Two layers: the first as in the test above, the second the same shifted by 1500 us; --layers 1:1 sees
    only the second, --layers 0:1 both, per layer."""
    first = _events()
    second = [{**e, "ts": e["ts"] + 1500, "args": {**e["args"], **({"correlation": e["args"]["correlation"] + 10}
                                                                  if "correlation" in e["args"] else {})}}
              for e in first]
    events = [e for e in first + second if e.get("ph") == "X"]
    one = trace_report.report(trace_report.layer_window(events, 1, 1))
    assert [p["layer"] for p in one["passes"]] == [0, 0]      # re-counted within the window
    assert one["gpu_busy_s"] == pytest.approx(500e-6)
    both = trace_report.per_layer(trace_report.report(trace_report.layer_window(events, 0, 1)), 2)
    assert both["gpu_busy_s"] == pytest.approx(500e-6)
    assert both["idle_by_range_ms"]["aq:B"] == pytest.approx(0.1)
    with pytest.raises(SystemExit, match="holds layers 0-1"):
        trace_report.layer_window(events, 1, 2)


def test_the_command_line_refuses_bad_input_in_one_line_with_exit_2(tmp_path, capsys):
    good = tmp_path / "trace.json.gz"
    with gzip.open(good, "wt") as f:
        json.dump({"traceEvents": _events()}, f)
    truncated = tmp_path / "cut.json.gz"
    truncated.write_bytes(good.read_bytes()[:40])
    cases = [([str(tmp_path / "missing.json")], "no trace file"),
             ([str(truncated)], "not a readable torch.profiler trace"),
             ([str(good), "--layers", "1-14"], "FIRST:LAST"),
             ([str(good), "--layers", "0:3"], "holds layers 0-0")]
    for argv, words in cases:
        assert trace_report.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, (argv, err)
    assert trace_report.main([str(good), "--layers", "0:0"]) == 0
