"""upstream/deadline.py: `within(timeout, awaitable)` on a real uvloop loop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from agproxy.upstream.deadline import within


def run(coro):
    return uvloop.run(coro)


async def never(seen: list):
    try:
        await asyncio.get_running_loop().create_future()
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise


def test_result_in_time_and_no_cancel_left_behind():
    async def main():
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, 42)
        value = await within(0.05, fut)
        task = asyncio.current_task()
        await asyncio.sleep(0.1)          # past the deadline: nothing fires at us later
        return value, task.cancelling()
    assert run(main()) == (42, 0)


def test_expiry_cancels_the_awaited_code_and_raises_timeout():
    seen: list = []

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError, match="no answer within 0.05s"):
            await within(0.05, never(seen))
        return loop.time() - start, asyncio.current_task().cancelling()
    elapsed, cancelling = run(main())
    assert seen == ["cancelled"]
    assert 0.045 <= elapsed < 1.0 and cancelling == 0


def test_exceptions_pass_through():
    async def boom():
        raise KeyError("x")

    async def main():
        with pytest.raises(KeyError):
            await within(1.0, boom())
    run(main())


def test_an_outside_cancel_is_not_a_timeout():
    seen: list = []

    async def main():
        started = asyncio.Event()

        async def waiter():
            started.set()
            return await within(5.0, never(seen))
        task = asyncio.ensure_future(waiter())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(main())
    assert seen == ["cancelled"]


def test_an_outside_cancel_together_with_expiry_stays_a_cancel():
    """The deadline fires and, before its CancelledError is handled, the client goes
    away too (a second cancel request): that is a cancellation, not a timeout."""
    async def main():
        async def waiter():
            task = asyncio.current_task()

            async def cancelled_twice():
                try:
                    await asyncio.get_running_loop().create_future()
                except asyncio.CancelledError:
                    task.cancel()         # the outside cancel, arriving with the expiry
                    raise
            return await within(0.02, cancelled_twice())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.ensure_future(waiter())
    run(main())


def test_awaited_code_that_swallows_the_cancel_leaves_no_request_behind():
    async def stubborn():
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            return "swallowed"

    async def main():
        value = await within(0.02, stubborn())
        return value, asyncio.current_task().cancelling()
    assert run(main()) == ("swallowed", 0)


def test_nested_deadlines_the_inner_one_fires_first():
    async def main():
        with pytest.raises(TimeoutError, match="0.02s"):
            await within(5.0, within(0.02, never([])))
        return asyncio.current_task().cancelling()
    assert run(main()) == 0
