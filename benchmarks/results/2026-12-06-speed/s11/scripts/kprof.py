import os, sys, time, statistics, torch
from torch.profiler import profile, ProfilerActivity
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir
torch.set_num_threads(1)
batch = 8
eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype="float32", num_blocks=512, block_size=16)
for b in range(batch):
    ids = [3 + (b * 7919 + i * 31) % 40000 for i in range(150 + 7 * b)]
    eng.add_request(f"r{b}", ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
    eng.step()
for mode in ("0", "1"):
    os.environ["SPLITSERVE_PAGED_KERNEL"] = mode
    for _ in range(3): eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(5): eng.step()
    ev = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    print(mode, [(e.key, e.count // 5, round(e.self_cpu_time_total / 5 / 1e3, 2)) for e in ev])
from engine import paged_kernel, attention
import engine.attention as A
tot = {"k": 0.0, "n": 0, "sdpa": 0.0, "m": 0}
orig = paged_kernel.paged_decode
def timed(*a, **k):
    t = time.perf_counter(); r = orig(*a, **k); tot["k"] += time.perf_counter() - t; tot["n"] += 1; return r
paged_kernel.paged_decode = timed
origd = A._decode_planned
def timedd(*a, **k):
    t = time.perf_counter(); r = origd(*a, **k); tot["sdpa"] += time.perf_counter() - t; tot["m"] += 1; return r
A._decode_planned = timedd
for mode in ("1", "0", "1", "0"):
    os.environ["SPLITSERVE_PAGED_KERNEL"] = mode
    ts = []
    for _ in range(8):
        t = time.perf_counter(); eng.step(); ts.append(time.perf_counter() - t)
    print(mode, round(statistics.median(ts) * 1e3, 2), {k: (round(v * 1e3 / 8, 2) if isinstance(v, float) else v) for k, v in tot.items()})
    tot.update(k=0.0, n=0, sdpa=0.0, m=0)
