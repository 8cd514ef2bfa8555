"""The garbage collector's settings for our long-running processes (the proxy and each worker)."""

from __future__ import annotations

import gc

# The cyclic collector's youngest generation is collected after this many new container objects
# (Python's default: 700). A request or an engine step makes hundreds (frames, futures, plans,
# token lists), so the default runs a collection every few requests; 10,000 measured ~11% less
# proxy CPU per pass-through request (docs/benchmarks.md §1). Garbage cycles wait a little
# longer to be collected; nothing else changes.
GC_YOUNG_THRESHOLD = 10_000


def settle_the_heap() -> None:
    """Once started: move everything made so far (modules, config, the model's objects) out of
    the collector's sight - it lives until the process ends, so rescanning it in every full
    collection is wasted work - and collect the youngest generation less often. (An object made
    before this that later dies inside a reference cycle is never reclaimed; what is made at start
    lives as long as the process - a reload reconfigures the components in place - and anything
    outside a cycle is freed by its reference count as always.)"""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)
