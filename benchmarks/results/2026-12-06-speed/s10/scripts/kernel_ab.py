"""In-process A/B: SPLITSERVE_PAGED_KERNEL 0 vs 1 on eager decode steps, batch B, interleaved blocks."""
import os, sys, time, statistics, torch
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from engine.paged_kernel import kernel
from models.builtin import builtin_model_dir
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
B = int(sys.argv[1]); ROUNDS = int(sys.argv[2])
kernel()
eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype="float32", num_blocks=1024, block_size=16)
for b in range(B):
    eng.add_request(f"r{b}", [3 + (b * 7919 + i * 31) % 40000 for i in range(180)], SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True))
while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
    eng.step()
res = {"0": [], "1": []}
for r in range(ROUNDS):
    for v in (("0", "1") if r % 2 == 0 else ("1", "0")):
        os.environ["SPLITSERVE_PAGED_KERNEL"] = v
        eng.step()
        ts = []
        for _ in range(6):
            t0 = time.perf_counter(); eng.step(); ts.append(time.perf_counter() - t0)
        res[v].append(statistics.median(ts) * 1e3)
a, b = statistics.median(res["0"]), statistics.median(res["1"])
print(f"batch {B} threads {torch.get_num_threads()}: sdpa {a:.2f} ms kernel {b:.2f} ms ratio sdpa/kernel {a/b:.3f}  sdpa {[round(x,1) for x in res['0']]} kernel {[round(x,1) for x in res['1']]}", flush=True)
