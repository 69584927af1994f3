cd /work/wt-speed
PY=/work/main/.venv/bin/python
echo "start $(date -u +%T) $(uptime)"
for r in 0 1; do
for v in 15 0; do
  ( sleep 25; ps -eo ni,args | grep "ray::Colocated" | grep -v grep | head -1 > /tmp/s10/out/c6_nice_${v}_$r.txt ) &
  RAY_worker_niceness=$v PYTHONPATH=/work/wt-speed timeout 400 $PY -m benchmarks.vs_vllm --rounds 1 --requests-per-stream 2 --streams 1,8 --targets colocated \
    --out /tmp/s10/c6_${v}_$r --json > /tmp/s10/out/c6_${v}_$r.json 2>/tmp/s10/out/c6_${v}_$r.err
  for n in 1 8; do echo "niceness $v ($(cat /tmp/s10/out/c6_nice_${v}_$r.txt | cut -c1-30)) round $r streams $n $(date -u +%T) $(grep -h "\"streams\": $n," /tmp/s10/out/c6_${v}_$r.err | $PY -c 'import json,sys; d=json.loads(sys.stdin.read()); print("tok/s %.1f ttft %.0f tpot %.1f load %s" % (d["tokens_per_s"], d["ttft_p50_ms"], d["tpot_p50_ms"], d["load1_start"]))')"; done
done
done
echo "end $(date -u +%T) $(uptime)"
