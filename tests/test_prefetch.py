"""LayerPrefetcher: the next layer is read on a background thread (pinned); a layer nobody asked for
is read at once into pageable memory; read errors reach the caller."""
import threading

import pytest
import torch

from alphaquant.pipeline.prefetch import LayerPrefetcher


class _Adapter:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def read_layer(self, model, i, pin):
        self.calls.append((i, pin, threading.current_thread() is threading.main_thread()))
        if i == self.fail:
            raise OSError(f"disk error reading layer {i}")
        return {"layer": i}


def test_first_layer_read_inline_unpinned_next_in_background_pinned():
    ad = _Adapter()
    pf = LayerPrefetcher(ad, model=None, n_layers=3, pin_memory=True)
    try:
        assert pf.take(0) == {"layer": 0}
        pf.request(1)
        pf.request(1)                                  # asked twice: read once
        pf.request(3)                                  # past the last layer: nothing
        assert pf.take(1) == {"layer": 1}
    finally:
        pf.close()
    assert ad.calls == [(0, False, True), (1, True, False)]


class _Placing(_Adapter):
    def place_layer(self, model, tensors, device):
        self.calls.append(("place", tensors["layer"], str(device), str(torch.cuda.current_stream(device))))
        return {**tensors, "placed": True}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_with_a_device_the_next_layer_is_placed_on_the_threads_own_stream():
    ad = _Placing()
    pf = LayerPrefetcher(ad, model=None, n_layers=3, pin_memory=True, device=torch.device("cuda", 0))
    try:
        assert pf.take(0) == {"layer": 0}              # the first layer: read inline, placed by install_layer
        pf.request(1)
        assert pf.take(1) == {"layer": 1, "placed": True}
    finally:
        pf.close()
    assert ad.calls[-1][:3] == ("place", 1, "cuda:0")
    assert ad.calls[-1][3] != str(torch.cuda.current_stream(0))     # not the main thread's stream


def test_no_room_for_the_copy_ahead_leaves_the_host_tensors_for_install():
    class _Full(_Adapter):
        def place_layer(self, model, tensors, device):
            raise torch.OutOfMemoryError("CUDA out of memory")
    pf = LayerPrefetcher(_Full(), model=None, n_layers=2, pin_memory=False, device=torch.device("cpu"))
    try:
        pf.request(1)
        assert pf.take(1) == {"layer": 1}
    finally:
        pf.close()


def test_without_a_device_nothing_is_placed_ahead():
    ad = _Placing()
    pf = LayerPrefetcher(ad, model=None, n_layers=2, pin_memory=False)
    try:
        pf.request(1)
        assert pf.take(1) == {"layer": 1}
    finally:
        pf.close()


def test_background_read_error_is_raised_by_take():
    pf = LayerPrefetcher(_Adapter(fail=2), model=None, n_layers=3, pin_memory=False)
    try:
        pf.request(2)
        with pytest.raises(OSError, match="layer 2"):
            pf.take(2)
    finally:
        pf.close()


def test_matches_says_whether_it_reads_what_a_walk_would():
    ad, model = _Adapter(), object()
    made = []

    def pf(adapter=ad, m=model, n=3, pin=False, device=None):
        made.append(LayerPrefetcher(adapter, model=m, n_layers=n, pin_memory=pin, device=device))
        return made[-1]
    try:
        a = pf()
        assert a.matches(pf())
        assert not a.matches(pf(adapter=_Adapter())) and not a.matches(pf(m=object()))
        assert not a.matches(pf(n=4)) and not a.matches(pf(device=torch.device("cpu")))
        assert not a.matches(pf(pin=True))
    finally:
        for p in made:
            p.close()


def test_for_walk_pins_and_copies_ahead_only_on_a_gpu_without_a_host_cache():
    class _Layers(_Adapter):
        def num_layers(self, model):
            return 5
    p = LayerPrefetcher.for_walk(_Layers(), None, torch.device("cpu"), cache_on_host=False)
    try:
        assert (p.n, p.pin, p.device) == (5, False, None)
    finally:
        p.close()


@pytest.fixture(scope="module")
def olmoe_lazy(tmp_path_factory):
    import tiny
    root = tmp_path_factory.mktemp("early")
    return root, tiny.write_corpus(root), tiny.make_checkpoint("olmoe", root / "olmoe")


@pytest.mark.parametrize("same", [True, False])
def test_the_sessions_early_first_layer_read_is_what_the_walk_uses(olmoe_lazy, monkeypatch, same):
    """session.run starts layer 0's read before the data stage (beside the GPU warm-up; stood in for here on the
    CPU): the walk takes it instead of reading the layer again, and the run's records are those of a run without
    it. A prefetcher that reads something else is closed and replaced."""
    from pipeline_utils import run_session, write_config

    from alphaquant.pipeline import prefetch as prefetch_mod
    from alphaquant.pipeline.session import CalibrationSession
    root, corpus, ckpt = olmoe_lazy
    cfg = write_config(root / f"early{same}.yaml", ckpt, corpus, model={"path": str(ckpt), "lazy": True},
                       eval={"enabled": False})
    plain = run_session(cfg)
    made, closed = [], []

    def early(session):
        n = session.adapter.num_layers(session.model)
        pf = LayerPrefetcher(session.adapter, session.model, n if same else n + 1, pin_memory=False)
        pf.request(0)
        made.append(pf)
        return pf
    real_close = prefetch_mod.LayerPrefetcher.close

    def spy_close(self):
        closed.append(self)
        real_close(self)
    monkeypatch.setattr(CalibrationSession, "_early_first_layer", early)
    monkeypatch.setattr(prefetch_mod.LayerPrefetcher, "close", spy_close)
    taken = []
    real_take = prefetch_mod.LayerPrefetcher.take
    monkeypatch.setattr(prefetch_mod.LayerPrefetcher, "take",
                        lambda self, i: (taken.append((self, i)), real_take(self, i))[1])
    s = run_session(cfg)
    assert len(made) == 1 and made[0] in closed
    assert (taken[0] == (made[0], 0)) is same                      # layer 0 from the early read, or read anew
    assert all((p is made[0]) is same for p, _ in taken)
    assert {n: r.rel_error for n, r in s.results["records"].items()} == \
        {n: r.rel_error for n, r in plain.results["records"].items()}
    for n, r in plain.results["records"].items():      # the solved scales (the lazy layers' weights are freed)
        assert torch.equal(s.results["records"][n].params.scale, r.params.scale)
