"""Options for the ingress<->worker channel (issue 17 item 2/5), measured from an asyncio loop in a
driver thread, as the ingress: awaited Ray call (plain, with an actor handle in the args, with
a nested ObjectRef in the reply), a Ray streaming-generator subscription, and a raw TCP socket.

    python -m benchmarks.channel_options
"""
import asyncio, statistics, threading, time, sys, struct, pickle
import cluster  # noqa
import ray

ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0)
class W:
    def __init__(self):
        self.subs = {}
        self.buf = []
        self.ev = None
    async def call(self, payload):
        return {"first_token": 1, "t": time.monotonic()}
    async def call_ref(self, payload):
        return {"first_token": 1, "kv": [ray.put(b"x" * 1000)]}
    async def submit(self, payload):
        self.buf.append((payload["rid"], time.monotonic()))
        self.ev.set()
    async def subscribe(self):
        self.ev = asyncio.Event()
        while True:
            try:
                await asyncio.wait_for(self.ev.wait(), 1.0)
            except asyncio.TimeoutError:
                yield []
                continue
            self.ev.clear()
            out, self.buf = self.buf, []
            yield out
    async def per_request(self, n):
        for i in range(n):
            await asyncio.sleep(0.02)
            yield {"token_ids": [i]}
    async def tcp(self):
        async def handle(r, w):
            while True:
                hdr = await r.readexactly(4)
                body = await r.readexactly(struct.unpack("!I", hdr)[0])
                msg = pickle.loads(body)
                data = pickle.dumps({"first_token": 1})
                w.write(struct.pack("!I", len(data)) + data)
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.srv = srv
        return srv.sockets[0].getsockname()[1]

w = W.remote()
other = W.remote()
payload = {"rid": "r", "prompt_token_ids": list(range(200)), "params": {"temperature": 0.0, "max_tokens": 64, "top_p": 1.0}}

async def main():
    await w.call.remote(payload)
    res = {}
    async def rt(name, make, n=200):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter(); await make(); ts.append(time.perf_counter() - t0)
        res[name] = statistics.median(ts) * 1e3
    await rt("await call", lambda: w.call.remote(payload))
    await rt("await call, actor handle in args", lambda: w.call.remote({**payload, "decode_actor": other}))
    await rt("await call, nested ObjectRef in reply", lambda: w.call_ref.remote(payload))
    # subscription: fire-and-forget submit, reply through a long-lived stream
    gen = w.subscribe.options(num_returns="streaming").remote()
    waiters = {}
    async def pump():
        while True:
            ref = await gen.__anext__()
            for rid, t in await ref:
                waiters.pop(rid).set_result(t)
    task = asyncio.ensure_future(pump())
    await asyncio.sleep(0.2)
    i = 0
    async def via_sub():
        nonlocal i
        i += 1
        fut = asyncio.get_running_loop().create_future()
        waiters[f"r{i}"] = fut
        w.submit.remote({**payload, "rid": f"r{i}"})
        await fut
    await rt("submit (not awaited) + reply on subscription stream", via_sub)
    task.cancel()
    port = await w.tcp.remote()
    r, wr = await asyncio.open_connection("127.0.0.1", port)
    async def via_tcp():
        data = pickle.dumps(payload)
        wr.write(struct.pack("!I", len(data)) + data)
        hdr = await r.readexactly(4)
        pickle.loads(await r.readexactly(struct.unpack("!I", hdr)[0]))
    await rt("raw TCP request/reply (pickle)", via_tcp)
    # per-item cost of a streaming generator: consumer-side time per yielded item
    t0 = time.perf_counter(); n = 0
    g = w.per_request.options(num_returns="streaming").remote(50)
    async for ref in g:
        await ref; n += 1
    res["per-request generator, 50 items at 20 ms: wall ms beyond 1000"] = (time.perf_counter() - t0) * 1e3 - 1000
    for k, v in res.items():
        print(f"{v:8.3f} ms  {k}")

loop = asyncio.new_event_loop()
th = threading.Thread(target=lambda: loop.run_until_complete(main()))
th.start(); th.join()
ray.shutdown()
