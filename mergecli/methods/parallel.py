"""The compiled loops' worker threads: one pool per process, sized like torch's intra-op pool.

Starting threads for every piece cost more than the loops themselves on small pieces (a
thread start waits for the thread to run), so the pool lives as long as the process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def map_parts(fn: Callable[[int], T], count: int) -> list[T]:
    """``[fn(0), …, fn(count − 1)]``, run on up to ``torch.get_num_threads()`` threads (in
    this thread when one is enough). The loops release the GIL, so the parts run at once."""
    threads = min(torch.get_num_threads(), count)
    if threads <= 1:
        return [fn(k) for k in range(count)]
    return list(_pool(torch.get_num_threads()).map(fn, range(count)))


def _pool(threads: int) -> ThreadPoolExecutor:
    with _LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="mergecli-compute")
        return _POOLS[threads]
