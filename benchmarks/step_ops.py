"""Ops launched per decode step (torch.profiler counts; independent of machine load) of the
engine on SmolLM2 at a batch size, one torch thread. Compare two trees with PYTHONPATH:

    git archive c9e5e99 engine models | tar -x -C /tmp/base
    (cd /tmp/base && PYTHONPATH=/tmp/base:$OLDPWD python $OLDPWD/benchmarks/step_ops.py 8)
    PYTHONPATH=. python benchmarks/step_ops.py 8

Prints a line ``RESULT {json}``.
"""
import sys, json, torch
from collections import Counter
from models.builtin import builtin_model_dir
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(1)
batch = int(sys.argv[1])
eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), num_blocks=256, block_size=16)
for b in range(batch):
    eng.add_request(f"r{b}", [3 + (b * 7919 + i * 31) % 40000 for i in range(40)], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
    eng.step()
eng.step()
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(2):
        eng.step()
ev = p.key_averages()
tot = sum(e.count for e in ev if e.key.startswith("aten::"))
c = {e.key: e.count // 2 for e in ev if e.key in ("aten::mm", "aten::linear", "aten::index_select", "aten::arange", "aten::cat", "aten::copy_", "aten::scaled_dot_product_attention", "mkldnn::_linear_pointwise")}
print("RESULT", json.dumps({"aten_ops_per_step": tot // 2, **c}))
