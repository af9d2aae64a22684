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
