"""cluster.channel on a real loopback socket: frames cut anywhere by TCP arrive whole and
in order, a wrong token is refused before anything is unpickled, a second channel of the
same ingress replaces the first (its end seen once), a closed channel fails what waits on
it; and a KV release goes over an open channel, as a Ray call only without one."""

from __future__ import annotations

import asyncio
import pickle
import struct

from cluster.channel import ChannelClosedError, ChannelServer
from cluster.channel_client import ChannelClient, ChannelPool, Mailbox
from cluster.dispatch import release_kv
from cluster.router import WorkerView


async def _echo_server(seen: list[dict], ended: list[str]) -> ChannelServer:
    def on_message(conn, msg):
        seen.append(msg)
        if "x" in msg:
            conn.send({"request_id": msg["request_id"], "echo": msg["x"]})

    srv = ChannelServer(on_message, lambda conn: ended.append(conn.client_id))
    await srv.start("127.0.0.1")
    return srv


def test_frames_cut_anywhere_arrive_whole_and_in_order():
    async def main():
        seen, ended = [], []
        srv = await _echo_server(seen, ended)
        info = srv.info()
        # A raw client writing the handshake and three frames one byte at a time.
        reader, writer = await asyncio.open_connection(info["host"], info["port"])
        frames = b"".join(struct.pack("!I", len(b)) + b for b in (
            pickle.dumps([{"request_id": f"r{i}", "x": i}], protocol=5) for i in range(3)))
        data = info["token"].encode() + struct.pack("!I", 3) + b"raw" + frames
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        for _ in range(200):
            if len(seen) == 3:
                break
            await asyncio.sleep(0.01)
        assert [m["x"] for m in seen] == [0, 1, 2]
        writer.close()
        # Through the client: many requests, a large message.
        c = await ChannelClient.connect("w", info, "ing-1")
        boxes = [Mailbox() for _ in range(50)]
        for i, box in enumerate(boxes):
            c.register(f"q{i}", box)
            await c.send({"request_id": f"q{i}", "x": i})
        assert [(await box.get(5))["echo"] for box in boxes] == list(range(50))
        big = Mailbox()
        c.register("big", big)
        await c.send({"request_id": "big", "x": b"k" * (8 << 20)})
        assert len((await big.get(10))["echo"]) == 8 << 20
        srv.close()

    asyncio.run(main())


def test_wrong_token_refused_replaced_channel_ended_once_closed_fails_waiters():
    async def main():
        seen, ended = [], []
        srv = await _echo_server(seen, ended)
        info = srv.info()
        reader, writer = await asyncio.open_connection(info["host"], info["port"])
        writer.write(b"0" * len(info["token"]) + struct.pack("!I", 1) + b"x")
        writer.write(struct.pack("!I", 4) + b"junk")  # would fail to unpickle if read
        await writer.drain()
        assert await asyncio.wait_for(reader.read(100), timeout=10) == b""
        writer.close()
        assert seen == []
        first = await ChannelClient.connect("w", info, "ing-1")
        second = await ChannelClient.connect("w", info, "ing-1")
        for _ in range(200):
            if first.closed:
                break
            await asyncio.sleep(0.01)
        assert first.closed and ended == ["ing-1"]
        box = Mailbox()
        second.register("r", box)
        srv.close()
        msg = await box.get(10)
        assert isinstance(msg["error"], ChannelClosedError) and second.closed
        for _ in range(200):
            if len(ended) == 2:
                break
            await asyncio.sleep(0.01)
        assert ended == ["ing-1", "ing-1"]  # each channel's end once

    asyncio.run(main())


class _Calls:
    """What a worker handle was asked (the Ray fallback of release_kv)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        outer = self

        class _Method:
            def remote(self, rid: str) -> None:
                outer.calls.append(rid)

        self.release_kv = _Method()


def test_kv_release_goes_over_an_open_channel_else_as_a_ray_call():
    async def main():
        seen, ended = [], []
        srv = await _echo_server(seen, ended)
        handle = _Calls()
        w = WorkerView(worker_id="p0", pool="prefill", handle=handle, node_ip="127.0.0.1")
        pool = ChannelPool("ing-1", lambda h: _ready(srv.info()))
        release_kv(pool, w, "req-a")  # no channel open yet: a Ray call
        await pool.get("p0", handle)
        release_kv(pool, w, "req-b")
        release_kv(None, w, "req-c")  # the Ray path (SPLITSERVE_CHANNEL=0)
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == [{"op": "release_kv", "request_id": "req-b"}]
        assert handle.calls == ["req-a", "req-c"]
        pool.close()
        srv.close()

    asyncio.run(main())


async def _ready(value):
    return value
