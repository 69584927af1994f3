import time, statistics, torch, numpy as np, torch.nn.functional as F
from engine._decode_kernel import decode
from engine.attention import _decode_plan, _decode_planned
torch.set_num_threads(1)
B, H, KVH, D, BS, NB = 8, 9, 3, 64, 16, 512
cache = torch.randn(2, NB, BS, KVH, D)
g = torch.Generator().manual_seed(0)
perm = torch.randperm(NB, generator=g).tolist()
ctx = [150 + 7 * b + 30 for b in range(B)]
tables = []; k = 0
for c in ctx:
    n = -(-c // BS); tables.append(perm[k:k + n]); k += n
q = torch.randn(B, H, D)
plan = _decode_plan(cache, tables, ctx, None)
ref = _decode_planned(q, cache, plan, D ** -0.5)
W = max(len(t) for t in tables)
tab = np.array([t + [0] * (W - len(t)) for t in tables], dtype=np.int64)
lens = np.array(ctx, dtype=np.int64)
out = np.empty((B, H, D), np.float32)
kn, vn = cache[0].numpy(), cache[1].numpy()
decode(q.numpy(), kn, vn, tab, lens, D ** -0.5, 0, out)
print("max abs diff", float((torch.from_numpy(out) - ref).abs().max()), float(ref.abs().max()))
for rep in range(3):
    t = time.perf_counter()
    for _ in range(200): _decode_planned(q, cache, plan, D ** -0.5)
    a = (time.perf_counter() - t) / 200
    t = time.perf_counter()
    for _ in range(200): decode(q.numpy(), cache[0].numpy(), cache[1].numpy(), tab, lens, D ** -0.5, 0, out)
    b = (time.perf_counter() - t) / 200
    print("sdpa+gather %.1f us, numba %.1f us" % (a * 1e6, b * 1e6))
