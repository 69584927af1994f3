import json, sys, statistics, collections
path, wall = sys.argv[1], float(sys.argv[2])
rows = [json.loads(l) for l in open(path)]
end = rows[-1]["t"] + rows[-1]["dt"]
rows = [r for r in rows if r["t"] >= end - wall - 0.05]
k = collections.defaultdict(lambda: [0, 0.0, 0, 0])
for r in rows:
    pre = sum(n for n in r["n"] if n > 1); dec = sum(1 for n in r["n"] if n == 1)
    kind = "decode" if not pre else ("prefill" if not dec else "mixed")
    k[kind][0] += 1; k[kind][1] += r["dt"]; k[kind][2] += pre; k[kind][3] += dec
busy = sum(r["dt"] for r in rows)
print(f"{path.split('/')[-2]}: 8-stream window {wall:.1f}s, steps busy {busy:.2f}s; " + "; ".join(
    f"{kk}: {v[0]} steps {v[1]:.2f}s, prefill tok {v[2]}, decode tok {v[3]}" for kk, v in k.items()))
b8 = [r["dt"] for r in rows if len(r["n"]) == 8 and all(n == 1 for n in r["n"])]
print(f"   pure b8 decode p50 {statistics.median(b8)*1e3:.1f} ms (n={len(b8)}), mean {statistics.mean(b8)*1e3:.1f}")
