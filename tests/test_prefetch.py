"""LayerPrefetcher: the next layer is read on a background thread (pinned); a layer nobody asked for
is read at once into pageable memory; read errors reach the caller."""
import threading

import pytest

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


def test_background_read_error_is_raised_by_take():
    pf = LayerPrefetcher(_Adapter(fail=2), model=None, n_layers=3, pin_memory=False)
    try:
        pf.request(2)
        with pytest.raises(OSError, match="layer 2"):
            pf.take(2)
    finally:
        pf.close()
