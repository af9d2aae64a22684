"""pipeline/gc_pause.py: the walk's frozen heap and its collector timing."""
import gc
import weakref

from alphaquant.pipeline.gc_pause import GCWatch, frozen_heap


class _Node:
    pass


def test_frozen_heap_freezes_what_exists_and_hands_it_back():
    before = gc.get_freeze_count()
    old = _Node()
    with frozen_heap():
        assert gc.get_freeze_count() > before             # the objects alive at entry are frozen
        assert not any(o is old for o in gc.get_objects())  # ... so no generation (and no collection) holds them
    assert gc.get_freeze_count() == 0                      # all handed back to the oldest generation
    assert any(o is old for o in gc.get_objects())


def test_cycles_made_inside_the_block_are_still_collected():
    with frozen_heap():
        a, b = _Node(), _Node()
        a.other, b.other = b, a                            # a reference cycle: only the collector frees it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None


def test_watch_counts_collections_by_generation_and_their_seconds():
    with GCWatch() as watch:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    assert watch.counts[0] >= 1 and watch.counts[2] >= 2   # automatic collections may add to these
    assert watch.seconds > 0.0
    first = watch.take()
    assert first == watch.seconds and watch.take() == 0.0   # take(): the seconds since the last take
    n = sum(watch.counts)
    gc.collect()                                           # uninstalled: no longer counted
    assert sum(watch.counts) == n
    assert watch.summary()["collections"]["gen2"] == watch.counts[2]
