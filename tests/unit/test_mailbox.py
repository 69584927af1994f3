"""cluster.channel_client.Mailbox: a request's messages from its channel, in order, to one consumer;
a timeout when none comes; a cancelled consumer leaves it usable."""

from __future__ import annotations

import asyncio

import pytest

from cluster.channel_client import Mailbox


def test_messages_in_order_whether_waiting_or_not():
    async def main():
        box = Mailbox()
        box.put_nowait({"i": 0})
        box.put_nowait({"i": 1})
        got = [await box.get(1.0), await box.get(1.0)]
        waiter = asyncio.ensure_future(box.get(5.0))
        await asyncio.sleep(0)
        assert not waiter.done()
        box.put_nowait({"i": 2})
        box.put_nowait({"i": 3})  # arrives before the woken consumer runs: kept for the next get
        got += [await waiter, await box.get(1.0)]
        assert box.empty()
        return got

    assert [m["i"] for m in asyncio.run(main())] == [0, 1, 2, 3]


def test_times_out_without_a_message_and_stays_usable():
    async def main():
        box = Mailbox()
        with pytest.raises(asyncio.TimeoutError):
            await box.get(0.05)
        box.put_nowait({"i": 9})
        return await box.get(0.05)

    assert asyncio.run(main()) == {"i": 9}


def test_cancelled_consumer_loses_nothing():
    async def main():
        box = Mailbox()
        t = asyncio.ensure_future(box.get(5.0))
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        box.put_nowait({"i": 1})  # after the cancel: no stale waiter is woken, the message stays
        return await box.get(0.5)

    assert asyncio.run(main()) == {"i": 1}
