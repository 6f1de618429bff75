"""prefetch: same items in the same order, errors re-raised, early stop ends the thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gampen_ml.data.datasets import prefetch


def test_prefetch_same_items_and_rng_order():
    def batches(rng):
        for i in range(7):
            yield i, rng.normal(size=3)

    direct = list(batches(np.random.default_rng(0)))
    ahead = list(prefetch(batches(np.random.default_rng(0)), depth=2))
    assert [i for i, _ in ahead] == list(range(7))
    for (_, a), (_, b) in zip(direct, ahead, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefetch_reraises_and_stops_early():
    def failing():
        yield 1
        raise RuntimeError("bad shard")

    with pytest.raises(RuntimeError, match="bad shard"):
        list(prefetch(failing()))
    before = threading.active_count()
    gen = prefetch(iter(range(1000)), depth=1)
    assert next(gen) == 0
    gen.close()
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="depth"):
        next(prefetch(iter([]), depth=0))
