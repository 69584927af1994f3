"""The kvtc v3 calibration of SmolLM2 from the calibration windows' KV already computed by
session8_probe.py (the same 3 windows of 1024+64 tokens calibrate_model prefills)."""
import os, sys, time, torch
CACHE = os.environ.get("KVQ_CACHE", "/tmp/kvq")
from kvtransfer import kvprobe
from kvtransfer.codecs.kvtc import calibrate_from_kv
from kvtransfer.codecs.kvtc_calib import cache_path
from models.builtin import builtin_model_dir
torch.set_num_threads(2)
md = builtin_model_dir("smollm2-135m-instruct")
t0 = time.time(); c0 = time.process_time()
probe = kvprobe.Probe(md, 1024 + 64)
wins = kvprobe.windows(probe.tok, "calib", 3, 1024, 64)
d = torch.load(CACHE + "/kv.pt")
cal = calibrate_from_kv(probe, [(kv, ids[1024:]) for kv, (_, ids) in zip(d["calib"], wins)])
cal.save(cache_path(md))
print(f"wall {time.time() - t0:.0f}s cpu {time.process_time() - c0:.0f}s", cache_path(md))
print(cal.ppl_cost_pct.round(2), cal.kl.round(4), cal.weight.round(2).tolist())
