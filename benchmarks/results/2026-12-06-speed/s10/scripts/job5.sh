cd /work/wt-speed
PY=/work/main/.venv/bin/python
echo "start $(date -u +%T) $(uptime)"
for r in 0 1 2; do
for v in auto hybrid; do
  case $v in auto) E="SPLITSERVE_DECODE_THREADS=same";; hybrid) E="SPLITSERVE_DECODE_THREADS=reserve";; esac
  mkdir -p /tmp/s10/steps5_${v}_$r
  env $E SPLITSERVE_STEPTRACE_DIR=/tmp/s10/steps5_${v}_$r PYTHONPATH=/work/wt-speed/benchmarks/steptrace:/work/wt-speed \
    timeout 400 $PY -m benchmarks.vs_vllm --rounds 1 --requests-per-stream 2 --streams 1,8 --targets colocated \
    --out /tmp/s10/c5_${v}_$r --json > /tmp/s10/out/c5_${v}_$r.json 2>/tmp/s10/out/c5_${v}_$r.err
  for n in 1 8; do echo "$v round $r streams $n $(date -u +%T) $(grep -h "\"streams\": $n," /tmp/s10/out/c5_${v}_$r.err | /work/main/.venv/bin/python -c 'import json,sys; d=json.loads(sys.stdin.read()); print("tok/s %.1f ttft %.0f tpot %.1f load %s" % (d["tokens_per_s"], d["ttft_p50_ms"], d["tpot_p50_ms"], d["load1_start"]))')"; done
done
done
echo "end $(date -u +%T) $(uptime)"
