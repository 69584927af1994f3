"""GEMM GFLOP/s by M, 1 thread, SmolLM2 shapes: ours (mkldnn packed, hint None / hint M), F.linear (MKL),
vLLM's onednn_mm."""
import time, statistics, torch, sys
import torch.nn.functional as F
torch.set_num_threads(1)


def _vllm_ops():
    try:
        from vllm import _custom_ops as ops  # lazily: optional heavy dependency
        return ops
    except Exception as e:  # noqa: BLE001
        print("no vllm ops", e)
        return None


ops = _vllm_ops()
shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
Ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,8,160,512,1280").split(",")]
def bench(f, x, reps):
    for _ in range(3): f(x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(x); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
with torch.inference_mode():
  for M in Ms:
    tot = {}
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K) * 0.02
        x = torch.randn(M, K)
        p0 = torch.ops.mkldnn._reorder_linear_weight(w, None)
        pM = torch.ops.mkldnn._reorder_linear_weight(w, M)
        cands = {"packed": lambda x: torch.ops.mkldnn._linear_pointwise(x, p0, None, "none", [], ""),
                 "packed_hintM": lambda x: torch.ops.mkldnn._linear_pointwise(x, pM, None, "none", [], ""),
                 "mkl": lambda x: F.linear(x, w)}
        if ops is not None:
            h = ops.create_onednn_mm(w.t(), 32)
            cands["vllm_onednn"] = lambda x, h=h: ops.onednn_mm(h, x, None)
        reps = max(5, min(200, int(2e8 / (2 * M * N * K) )))
        for rnd in range(2):
            for c, f in cands.items():
                tot.setdefault(c, {}).setdefault(name, []).append(bench(f, x, reps))
    flops = {n: 2 * M * N * K for n, (N, K) in shapes.items()}
    line = []
    for c, per in tot.items():
        s = sum(min(v) for v in per.values())
        line.append(f"{c} {s*1e3:.3f} ms/layer {sum(flops.values())/s/1e9:.0f} GF/s")
    print(f"M={M}: " + " | ".join(line), flush=True)
