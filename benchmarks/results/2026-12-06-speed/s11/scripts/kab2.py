import os, sys, time, statistics, torch
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir
torch.set_num_threads(int(sys.argv[1]))
batch = int(sys.argv[2])
eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype="float32", num_blocks=512, block_size=16)
for b in range(batch):
    ids = [3 + (b * 7919 + i * 31) % 40000 for i in range(150 + 7 * b)]
    eng.add_request(f"r{b}", ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
    eng.step()
res = {"0": [], "auto": []}
for blk in range(12):
    mode = "auto" if blk % 2 else "0"
    os.environ["SPLITSERVE_PAGED_KERNEL"] = mode
    for i in range(8):
        t = time.perf_counter(); eng.step(); dt = time.perf_counter() - t
        if i >= 1: res[mode].append(dt)
print(sys.argv[1:], {k: round(statistics.median(v) * 1e3, 2) for k, v in res.items()})
