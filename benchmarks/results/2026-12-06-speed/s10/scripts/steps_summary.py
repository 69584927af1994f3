"""Summarize steptrace jsonl files (one per worker process): steps by kind (pure decode,
mixed decode+prefill, pure prefill), tokens, time, per-step p50."""
import json, sys, statistics, glob, collections
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path)]
    rows = [r for r in rows if not r["po"]]
    if not rows: continue
    # split into bursts separated by idle > 2 s (each closed-loop run)
    bursts, cur = [], [rows[0]]
    for a, b in zip(rows, rows[1:]):
        if b["t"] - (a["t"] + a["dt"]) > 2.0:
            bursts.append(cur); cur = []
        cur.append(b)
    bursts.append(cur)
    print(path)
    for bi, br in enumerate(bursts):
        kinds = collections.defaultdict(list)
        for r in br:
            dec = sum(1 for n in r["n"] if n == 1); pre = [n for n in r["n"] if n > 1]
            k = "decode" if not pre else ("prefill" if dec == 0 else "mixed")
            kinds[k].append((r["dt"], dec, sum(pre), r["cpu"], len(pre)))
        wall = br[-1]["t"] + br[-1]["dt"] - br[0]["t"]
        busy = sum(r["dt"] for r in br)
        print(f"  burst {bi}: {len(br)} steps, wall {wall:.1f}s busy {busy:.1f}s ({busy/wall:.0%}), tokens {sum(sum(r['n']) for r in br)}")
        for k, v in kinds.items():
            dts = [x[0] for x in v]
            decs = [x[1] for x in v]; pres = [x[2] for x in v]; cpu = [x[3] for x in v]
            print(f"    {k:8s} n={len(v):4d} sum {sum(dts):6.2f}s p50 {statistics.median(dts)*1e3:7.1f} ms "
                  f"mean {statistics.mean(dts)*1e3:7.1f} ms | decodes/step p50 {statistics.median(decs)} "
                  f"| prefill tok/step mean {statistics.mean(pres):.0f} max {max(pres)} sum {sum(pres)} "
                  f"| cpu/dt {sum(cpu)/sum(dts):.2f}")
        # decode-step time by batch size (pure decode)
        bys = collections.defaultdict(list)
        for r in br:
            if all(n == 1 for n in r["n"]): bys[len(r["n"])].append(r["dt"])
        print("    pure decode p50 by batch: " + ", ".join(f"{b}:{statistics.median(v)*1e3:.0f}ms(n{len(v)})" for b, v in sorted(bys.items())))
        # prefill ms/token estimate: mixed and prefill steps, (dt - decode step p50 of its batch) / prefill tokens
        est = []
        for r in br:
            pre = sum(n for n in r["n"] if n > 1); dec = sum(1 for n in r["n"] if n == 1)
            if pre >= 64:
                base = statistics.median(bys[dec]) if dec in bys else 0.0
                est.append((r["dt"] - base) / pre * 1e3)
        if est:
            print(f"    prefill marginal ms/token p50 {statistics.median(est):.2f} (n={len(est)})")
