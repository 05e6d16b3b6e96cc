"""A started node freezes its start-up heap (server.gc_freeze)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from apix.core import gc as node_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restore_gc")
def test_settle_freezes_what_exists_and_collects_young_objects_less_often() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    node_gc.settle()
    assert gc.get_freeze_count() > 1000  # everything imported so far
    assert gc.get_threshold()[0] == node_gc.YOUNG_THRESHOLD
    # What comes later is still collected: a cycle made now goes away.
    made = [object()]
    made.append(made)  # type: ignore[arg-type]
    del made
    assert gc.collect() >= 1
