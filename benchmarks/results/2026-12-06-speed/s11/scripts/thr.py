import sys, time, threading, statistics, os
import torch
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype="float32", num_blocks=512, block_size=16)
def run(batch, steps=30):
    for b in range(batch):
        ids = [3 + (b * 7919 + i * 31) % 40000 for i in range(150)]
        eng.add_request(f"r{time.time()}{b}", ids, SamplingParams(temperature=0, max_tokens=steps + 5, ignore_eos=True))
    while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    ts = []
    while eng.has_work:
        t = time.perf_counter(); eng.step(); ts.append(time.perf_counter() - t)
    return statistics.median(ts[2:]) * 1e3
res = {}
for rnd in range(2):
    for where in (("thread", "main") if rnd % 2 == 0 else ("main", "thread")):
        for b in (1, 8):
            if where == "main":
                v = run(b)
            else:
                out = []
                th = threading.Thread(target=lambda: out.append(run(b))); th.start(); th.join()
                v = out[0]
            res.setdefault((where, b), []).append(round(v, 1))
print(torch.get_num_threads(), res)
