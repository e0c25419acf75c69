"""Write-side flow control shared by every protocol object (client and upstream side).

asyncio calls `pause_writing()` when a transport's buffer passes its high-water mark
and `resume_writing()` once it drained; `drain()` turns that into something any
number of writers (HTTP/2 streams, a body pump) can await. `_fail_drains()` wakes
them with an error when the connection is lost, so no writer waits forever.
A class using it keeps `write_paused` and `_drain_waiters` in its own `__slots__`
(if it has any) and sets `_drain_waiters = []` in `__init__`; `_write_closed()`
says when the connection is gone (by default: `transport` is None).
"""

from __future__ import annotations

import asyncio


class WriteFlowControl:
    __slots__ = ()

    write_lost_message = "connection lost"

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        if not self.write_paused:
            return
        if self._write_closed():
            raise ConnectionResetError(self.write_lost_message)
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        await fut

    def _write_closed(self) -> bool:
        return self.transport is None

    def _fail_drains(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(ConnectionResetError(self.write_lost_message))
