"""In one process: step time with 1 vs 2 torch threads (set on the stepping thread), by step
kind, interleaved in blocks. Kinds: decode b1, decode b8, prefill 160 (alone), mixed (7 decodes + 160)."""
import sys, time, statistics, torch
from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype="float32", num_blocks=2048, block_size=16,
                               scheduler_config=SchedulerConfig(max_num_batched_tokens=512, max_model_len=2048))
tag = [0]
def add(n, tok, mt):
    out = []
    for b in range(n):
        tag[0] += 1
        out.append(eng.add_request(f"r{tag[0]}", [3 + (tag[0] * 7919 + i * 31) % 40000 for i in range(tok)],
                                   SamplingParams(temperature=0, max_tokens=mt, ignore_eos=True)))
    return out
def settle():
    while eng.scheduler.waiting or any(not s.output_token_ids for s in eng.scheduler.running):
        eng.step()
def timed():
    t0 = time.perf_counter(); o = eng.step(); return time.perf_counter() - t0, o.num_tokens
res = {}
torch.set_num_threads(1)
# warm both thread counts
for th in (1, 2, 1):
    torch.set_num_threads(th); add(1, 160, 3); settle(); 
    while eng.has_work: eng.step()
for r in range(ROUNDS):
    for th in ((1, 2) if r % 2 == 0 else (2, 1)):
        torch.set_num_threads(th)
        # prefill alone
        add(1, 160, 1); dt, n = timed(); res.setdefault((th, "prefill160"), []).append(dt)
        while eng.has_work: eng.step()
        # decode b1
        s = add(1, 160, 1000); settle(); eng.step()
        res.setdefault((th, "decode_b1"), []).append(statistics.median([timed()[0] for _ in range(6)]))
        # decode b8 (7 more)
        more = add(7, 160, 1000); settle(); eng.step()
        res.setdefault((th, "decode_b8"), []).append(statistics.median([timed()[0] for _ in range(6)]))
        # mixed: abort one, add one 160 prompt -> 7 decodes + 160
        eng.abort(s[0].request_id); eng.step()
        add(1, 160, 1000); dt, n = timed(); res.setdefault((th, "mixed_7d+160"), []).append(dt)
        res.setdefault((th, "decode_b8_after"), []).append(statistics.median([timed()[0] for _ in range(4)]))
        for seq in list(eng.scheduler.running) + list(eng.scheduler.waiting):
            eng.abort(seq.request_id)
for kind in ("prefill160", "decode_b1", "decode_b8", "mixed_7d+160", "decode_b8_after"):
    a = statistics.median(res[(1, kind)]); b = statistics.median(res[(2, kind)])
    print(f"{kind:16s} 1 thread {a*1e3:7.1f} ms  2 threads {b*1e3:7.1f} ms  t1/t2 {a/b:.2f}   "
          f"t1 {[round(x*1e3) for x in res[(1, kind)]]} t2 {[round(x*1e3) for x in res[(2, kind)]]}", flush=True)
