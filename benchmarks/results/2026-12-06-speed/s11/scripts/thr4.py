import sys, time, threading, statistics, resource
import torch
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir
torch.set_num_threads(1)   # main thread never has a team
eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype="float32", num_blocks=512, block_size=16)
def run(batch, steps=30):
    torch.set_num_threads(2)
    for b in range(batch):
        ids = [3 + (b * 7919 + i * 31) % 40000 for i in range(150)]
        eng.add_request(f"r{time.time()}{b}", ids, SamplingParams(temperature=0, max_tokens=steps + 5, ignore_eos=True))
    while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    ts = []
    r0 = resource.getrusage(resource.RUSAGE_SELF); n = 0
    while eng.has_work:
        t = time.perf_counter(); eng.step(); ts.append(time.perf_counter() - t); n += 1
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return round(statistics.median(ts[2:]) * 1e3, 1), (r1.ru_nvcsw - r0.ru_nvcsw) // n, round((r1.ru_stime - r0.ru_stime) / n * 1e3, 1)
mode = sys.argv[1]
for b in (1, 8, 1, 8):
    out = []
    th = threading.Thread(target=lambda: out.append(run(b))); th.start(); th.join()
    if mode == "two":  # a second thread also computes with 2 threads once (its own team)
        pass
    print(mode, b, "ms, vcsw/step, sys ms/step", out[0], flush=True)
    if mode == "two" and b == 1:
        def other():
            torch.set_num_threads(2); torch.randn(4000, 4000) @ torch.randn(4000, 4000)
        t2 = threading.Thread(target=other); t2.start(); t2.join()  # exits: its pool goes
        def other_keep(ev):
            torch.set_num_threads(2); torch.randn(4000, 4000) @ torch.randn(4000, 4000); ev.wait()
        ev = threading.Event(); t3 = threading.Thread(target=other_keep, args=(ev,), daemon=True); t3.start()
