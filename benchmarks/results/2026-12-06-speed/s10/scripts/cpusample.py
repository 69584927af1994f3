import os, sys, time, json
def snap():
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try:
            s = open(f"/proc/{p}/stat").read()
            comm = s[s.index("(") + 1:s.rindex(")")]
            f = s[s.rindex(")") + 2:].split()
            cmd = open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:120]
            out[p] = (comm, int(f[11]) + int(f[12]), cmd)
        except Exception:
            pass
    return out
dur = float(sys.argv[1]); t0 = time.time(); a = snap(); time.sleep(dur); b = snap()
rows = []
for p, (c, t, cmd) in b.items():
    d = t - a.get(p, (c, 0, cmd))[1]
    if d > 0: rows.append((d / os.sysconf("SC_CLK_TCK"), p, c, cmd))
rows.sort(reverse=True)
tot = sum(r[0] for r in rows)
print(f"window {dur}s total cpu {tot:.1f}s")
for r in rows[:15]: print(f"{r[0]:6.2f}s {r[1]:>7} {r[2]:20s} {r[3]}")
