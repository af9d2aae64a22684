"""PlotWorker (alphaquant/pipeline/plots.py): the plots drawn in a child process are the files save_plots draws in
this one (same PNG bytes), a child that fails or cannot start falls back to drawing here, and close ends it."""
import random
import subprocess

from alphaquant.pipeline import plots


def _results():
    rnd = random.Random(0)
    return {"layers": [{"layer": i, "mean_rel_error": rnd.random(), "max_rel_error": rnd.random()} for i in range(4)],
            "experts": [{"block": f"model.layers.{i}.mlp", "counts": [rnd.randint(0, 99) for _ in range(8)]}
                        for i in range(4)],
            "other": object()}          # not JSON: only layers and experts go to the child


def test_the_child_draws_the_same_files(tmp_path):
    ws = plots.PlotWorkers(groups=(plots.FIGURES,))       # one child drawing both figures
    w, = ws.workers
    assert w.proc is not None
    got = ws.draw(_results(), tmp_path / "child")
    assert w.proc is None                                  # ended after its one request
    ref = plots.save_plots(_results(), tmp_path / "here")
    assert set(got) == set(ref) == {"layer_error", "tokens_per_expert"}
    for k in ref:
        assert got[k] == tmp_path / "child" / ref[k].name and got[k].read_bytes() == ref[k].read_bytes()


def test_a_failing_child_falls_back_to_drawing_here(tmp_path, monkeypatch):
    ws = plots.PlotWorkers(groups=(plots.FIGURES,))
    w, = ws.workers
    w.proc.kill()
    w.proc.wait()                                          # died before the request
    got = ws.draw(_results(), tmp_path / "p")
    assert set(got) == {"layer_error", "tokens_per_expert"} and all(p.is_file() for p in got.values())

    def no_python(*a, **k):
        raise OSError("no interpreter")
    monkeypatch.setattr(subprocess, "Popen", no_python)
    ws = plots.PlotWorkers(groups=(plots.FIGURES,))
    assert ws.workers[0].proc is None
    assert set(ws.draw(_results(), tmp_path / "q")) == {"layer_error", "tokens_per_expert"}


def test_close_ends_a_waiting_child():
    w = plots.PlotWorker()
    proc = w.proc
    w.close()
    assert proc.poll() is not None and w.proc is None


def test_the_child_exits_when_the_run_is_killed(tmp_path):
    """A run killed outright (SIGKILL: no cleanup) closes the child's stdin; the child then exits by itself."""
    import os
    import signal
    import sys
    import time
    parent = subprocess.Popen([sys.executable, "-c", "import time\nfrom alphaquant.pipeline.plots import PlotWorker\n"
                               "w = PlotWorker()\nprint(w.proc.pid, flush=True)\ntime.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return                                       # gone (reaped by init)
        try:
            with open(f"/proc/{child}/stat") as f:       # a zombie has exited too
                if f.read().split(") ")[-1].startswith("Z"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the plot worker outlived its killed parent")


def test_one_worker_per_figure_draws_the_same_files(tmp_path):
    ws = plots.PlotWorkers()
    assert [w.figures for w in ws.workers] == [(f,) for f in plots.FIGURES]
    got = ws.draw(_results(), tmp_path / "child")
    assert all(w.proc is None for w in ws.workers)         # each ended after its one request
    ref = plots.save_plots(_results(), tmp_path / "here")
    assert list(got) == list(ref) == list(plots.FIGURES)
    for k in ref:
        assert got[k] == tmp_path / "child" / ref[k].name and got[k].read_bytes() == ref[k].read_bytes()


def test_a_failing_figure_worker_has_only_its_figure_drawn_here(tmp_path, monkeypatch):
    ws = plots.PlotWorkers()
    dead = ws.workers[1]
    dead.proc.kill()
    dead.proc.wait()
    drawn_here = []
    real = plots.save_plots

    def spy(results, directory, only=plots.FIGURES):
        drawn_here.append(tuple(only))
        return real(results, directory, only=only)
    monkeypatch.setattr(plots, "save_plots", spy)
    got = ws.draw(_results(), tmp_path / "p")
    assert drawn_here == [(plots.FIGURES[1],)]
    assert list(got) == list(plots.FIGURES) and all(p.is_file() for p in got.values())


def test_save_plots_draws_only_the_figures_asked_for(tmp_path):
    assert list(plots.save_plots(_results(), tmp_path, only=("tokens_per_expert",))) == ["tokens_per_expert"]
    assert not (tmp_path / "layer_error.png").exists()
    assert plots.save_plots({"layers": [], "experts": []}, tmp_path / "none") == {}


def _other_results():
    r = _results()
    r["experts"][0]["counts"] = list(reversed(r["experts"][0]["counts"]))
    return r


def test_plot_data_draws_what_the_results_draw(tmp_path):
    data = plots.plot_data(_results())
    assert set(data) == {"layers", "experts"} and "other" not in data
    ref = plots.save_plots(_results(), tmp_path / "full")
    got = plots.save_plots(data, tmp_path / "part")
    assert all(got[k].read_bytes() == ref[k].read_bytes() for k in ref)


def test_started_workers_draw_before_draw_is_called(tmp_path):
    import time
    ws = plots.PlotWorkers()
    ws.start(_results(), tmp_path / "early")
    deadline = time.monotonic() + 60
    while not all((tmp_path / "early" / f"{f}.png").is_file() for f in plots.FIGURES):
        assert time.monotonic() < deadline, "the started workers drew nothing"
        time.sleep(0.05)
    got = ws.draw(_results(), tmp_path / "early")            # same data: only collected
    assert all(w.proc is None for w in ws.workers)
    ref = plots.save_plots(_results(), tmp_path / "here")
    assert list(got) == list(plots.FIGURES)
    assert all(got[k].read_bytes() == ref[k].read_bytes() for k in ref)


def test_results_that_changed_after_start_are_drawn_again(tmp_path):
    ws = plots.PlotWorkers()
    ws.start(_results(), tmp_path / "p")
    got = ws.draw(_other_results(), tmp_path / "p")          # the early figures are not these results'
    ref = plots.save_plots(_other_results(), tmp_path / "ref")
    assert all(w.proc is None for w in ws.workers)
    assert all(got[k].read_bytes() == ref[k].read_bytes() for k in ref)
    before = plots.save_plots(_results(), tmp_path / "before")
    assert got["tokens_per_expert"].read_bytes() != before["tokens_per_expert"].read_bytes()


def test_a_run_starts_its_plots_at_the_last_layer_with_its_final_data(tmp_path, monkeypatch):
    """Calibration with plot workers (a GPU run's choice, forced here on CPU): the workers are handed the figures'
    data when the last layer ends, it is the data of the summary the run returns, and the checkpoint's plots are
    the figures of that summary."""
    import tiny
    from pipeline_utils import run_session, write_config

    import alphaquant.pipeline.calibrate as calibrate
    corpus, model_dir = tiny.write_corpus(tmp_path), tiny.make_checkpoint("olmoe", tmp_path / "olmoe")
    monkeypatch.setattr(calibrate, "plots_in_children", lambda trainer: True)
    starts, layers_ended = [], []
    real_start, real_end = plots.PlotWorkers.start, calibrate.LayerProgress.layer_done

    def spy_start(self, results, directory):
        starts.append((plots.plot_data(results), len(layers_ended)))
        return real_start(self, results, directory)

    def spy_end(self, i, stats, **kw):
        layers_ended.append(i)
        return real_end(self, i, stats, **kw)
    monkeypatch.setattr(plots.PlotWorkers, "start", spy_start)
    monkeypatch.setattr(calibrate.LayerProgress, "layer_done", spy_end)
    out = tmp_path / "out"
    session = run_session(write_config(tmp_path / "run.yaml", model_dir, corpus,
                                       output={"save": True, "dir": str(out)}))
    n = session.adapter.num_layers(session.model)
    (data, ended_before), = starts
    assert ended_before == n - 1                       # during the last layer's end, before its progress line
    results = session.results
    assert data == plots.plot_data(results)
    ref = plots.save_plots(results, tmp_path / "ref")
    assert set(ref) == set(plots.FIGURES)
    for k, path in ref.items():
        assert (out / "plots" / path.name).read_bytes() == path.read_bytes()
    assert not list(tmp_path.glob(".out.tmp-*"))
