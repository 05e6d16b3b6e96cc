"""The garbage collector on a long-running node.

A started node holds a large, permanent heap (modules, the app's routes and models, SQL
metadata): a full collection walks all of it and paused the event loop for 0.2 to 0.4 s
in the connect benchmark, which every in-flight connect and event then waited out.
"""

from __future__ import annotations

import gc

# Young collections per this many new container objects (CPython's default: 700). A
# connect or a request allocates a few thousand, so the default ran several per connect.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Call once the node has started: what exists now lives as long as the process."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
