"""Session 8 probe: keys before RoPE on SmolLM2's KV, before it was built into kvtc.
Ran against kvtc calibration v2 (keys coded as cached; commit c9e5e99's code, whose
load_or_calibrate reads kvtc-v2.npz): "base" = kvtc v2 as it was; "pre" = the same codec
on keys un-rotated per position (a PCA computed on un-rotated calibration keys, v2's
sensitivity weights), RoPE re-applied after decoding. Also caches the calibration and
evaluation windows' KV in $KVQ_CACHE/kv.pt for session8_calib_cached.py / session8_evalv3.py.
    git worktree add /tmp/v2 c9e5e99 && cd /tmp/v2 && PYTHONPATH=$PWD python THIS_FILE base pre
"""
import os, sys, time, torch, numpy as np
CACHE = os.environ.get("KVQ_CACHE", "/tmp/kvq")
from pathlib import Path
from kvtransfer import kvprobe
from kvtransfer.codecs.kvtc import KVTCCodec, load_or_calibrate
from kvtransfer.codecs.kvtc_calib import calibrate_kv
from engine.rope import Rotary, apply_rotary
from models.builtin import builtin_model_dir
torch.set_num_threads(2)
md = builtin_model_dir("smollm2-135m-instruct")
cache = Path(CACHE + "/kv.pt")
probe = kvprobe.Probe(md, 2048 + 64)
if cache.exists():
    d = torch.load(cache)
else:
    t = time.time()
    cw = kvprobe.windows(probe.tok, "calib", 3, 1024, 64)
    ew = kvprobe.windows(probe.tok, "eval", 2, 2048, 64)
    d = {"calib": [probe.context_kv(ids[:1024])[0] for _, ids in cw],
         "eval": [(probe.context_kv(ids[:2048])[0], ids[2048:]) for _, ids in ew]}
    torch.save(d, cache); print("kv", time.time() - t)
rot = Rotary(probe.model.cfg)
def rope(kv, sign):
    L, _, T, H, D = kv.shape
    cos, sin = rot.cos_sin(torch.arange(T), torch.float32)
    out = kv.clone()
    for l in range(L):
        out[l, 0] = apply_rotary(kv[l, 0].float(), cos, sign * sin)
    return out
cal = load_or_calibrate(md)
refs = [probe.score(kv.to(torch.bfloat16), c, keep_logprobs=True) for kv, c in d["eval"]]
def run(name, calx, pre, levels, head0=1):
    for lv in levels:
        tot = nb = 0; kls = []
        for (kv, c), ref in zip(d["eval"], refs):
            x = kv.to(torch.bfloat16)
            xin = rope(x.float(), -1).to(torch.bfloat16) if pre else x
            parts = []
            for a in range(0, 2048, 512):
                codec = KVTCCodec(level=lv, calibration=calx, exact_head=head0 if a == 0 else 1)
                b = codec.encode(xin[:, :, a:a+512]); nb += len(b)
                parts.append(codec.decode(b))
            y = torch.cat(parts, 2)
            if pre: y = rope(y.float(), 1)
            kls.append(kvprobe.kl(ref, probe.score(y, c, keep_logprobs=True)))
            tot += kv.numel() * 2
        print(f"{name} L{lv}: x{tot/nb:.2f} KL {np.mean(kls):.4f}", flush=True)
which = sys.argv[1:] or ["base", "pre"]
if "base" in which: run("base", cal, False, [4, 5, 6, 7])
if "pre" in which:
    calp = calibrate_kv([rope(k, -1) for k in d["calib"]])
    calp.weight = cal.weight.copy()
    run("pre", calp, True, [4, 5, 6, 7])
if "sink" in which: run("sink4", cal, False, [5, 7], head0=4)
