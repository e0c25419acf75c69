"""One object per event loop (the pool, the head-timeout sweep): connections and
timers belong to the loop that made them. The last (loop, object) pair is kept so
the per-request lookup is an identity check, not a weak-dictionary lookup."""

from __future__ import annotations

import asyncio
import weakref
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    def __init__(self, factory: Callable[[], T]):
        self._factory = factory
        self._objects: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T]" = weakref.WeakKeyDictionary()
        self._last: tuple = (None, None)

    def get(self) -> T:
        """The running loop's object, made on first use."""
        loop = asyncio.get_running_loop()
        last_loop, obj = self._last
        if last_loop is loop:
            return obj
        obj = self._objects.get(loop)
        if obj is None:
            obj = self._objects[loop] = self._factory()
        self._last = (loop, obj)
        return obj

    def set(self, obj: T) -> None:
        """Make obj the running loop's object."""
        loop = asyncio.get_running_loop()
        self._objects[loop] = obj
        self._last = (loop, obj)
