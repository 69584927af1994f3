cd /work/wt-speed
PY=/work/main/.venv/bin/python
echo "start $(date -u +%T) $(uptime)"
for r in 0 1; do
for v in default passive spin; do
  case $v in default) E="";; passive) E="OMP_WAIT_POLICY=PASSIVE";; spin) E="GOMP_SPINCOUNT=20000";; esac
  mkdir -p /tmp/s10/steps4_${v}_$r
  env $E SPLITSERVE_STEPTRACE_DIR=/tmp/s10/steps4_${v}_$r PYTHONPATH=/work/wt-speed/benchmarks/steptrace:/work/wt-speed \
    timeout 400 $PY -m benchmarks.vs_vllm --rounds 1 --requests-per-stream 2 --streams 8 --targets colocated \
    --out /tmp/s10/c4_${v}_$r --json > /tmp/s10/out/c4_${v}_$r.json 2>/tmp/s10/out/c4_${v}_$r.err
  echo "$v round $r $(date -u +%T) $(uptime | sed 's/.*average//')  $(grep -h '"streams"' /tmp/s10/out/c4_${v}_$r.err | cut -c60-300)"
done
done
echo "end $(date -u +%T) $(uptime)"
