"""Session 8 table from the cached eval KV of session8_probe.py (benchmarks.kv_quality's
first 2 eval windows): same scoring as benchmarks.kv_quality.run."""
import os, sys, time, math, json, statistics, torch
CACHE = os.environ.get("KVQ_CACHE", "/tmp/kvq")
from pathlib import Path
from kvtransfer import kvprobe
from benchmarks.kv_quality import make_codec, code, speed
from models.builtin import builtin_model_dir
torch.set_num_threads(1)
md = builtin_model_dir("smollm2-135m-instruct")
d = torch.load(CACHE + "/kv.pt")
probe = kvprobe.Probe(md, 2048 + 64)
labels = sys.argv[1].split(",")
dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["bfloat16", "float16"]
codecs = {lb: make_codec(lb, md) for lb in labels}
res = {}
for dt in dtypes:
    rows = {}
    refs = [(probe.score(kv.to(getattr(torch, dt)), c, keep_logprobs=True), kv.to(getattr(torch, dt)), c) for kv, c in d["eval"]]
    nll0 = sum(r.nll for r, _, _ in refs); ntok = sum(r.tokens for r, _, _ in refs)
    for lb, codec in codecs.items():
        nb = fp = 0; nll = 0; kls = []; ag = []
        for ref, kv, c in refs:
            n, out = code(codec, kv, 512); nb += n; fp += kv.numel() * 2
            s = probe.score(out, c, keep_logprobs=True); nll += s.nll
            kls.append(kvprobe.kl(ref, s)); ag.append(sum(x == y for x, y in zip(s.argmax, ref.argmax)) / len(ref.argmax))
        enc, dec = speed(codec, refs[0][1][:, :, :512], 3)
        rows[lb] = {"ratio_vs_fp16": fp / nb, "ppl_pct": 100 * (math.exp((nll - nll0) / ntok) - 1),
                    "kl": statistics.fmean(kls), "greedy_agree": statistics.fmean(ag), "encode_MBps": enc, "decode_MBps": dec}
        r = rows[lb]
        i8 = rows.get("int8", {}).get("ratio_vs_fp16")
        print(f"| {dt} | {lb} | {r['ratio_vs_fp16']:.2f} | {r['ratio_vs_fp16'] / i8 if i8 else float('nan'):.2f} | {r['ppl_pct']:+.2f}% | {r['kl']:.4f} | {r['greedy_agree']:.3f} | {enc:.0f} | {dec:.0f} |", flush=True)
    res[dt] = rows
Path(sys.argv[3] if len(sys.argv) > 3 else CACHE + "/evalv3.json").write_text(json.dumps(res, indent=1))
