cd /work/wt-speed
PY=/work/main/.venv/bin/python
echo "start $(date -u +%T) $(uptime)"
for r in 0 1; do
for th in auto reserve; do
  mkdir -p /tmp/s10/steps_${th}_$r
  SPLITSERVE_THREADS=$th SPLITSERVE_STEPTRACE_DIR=/tmp/s10/steps_${th}_$r PYTHONPATH=/work/wt-speed/benchmarks/steptrace:/work/wt-speed \
    timeout 600 $PY -m benchmarks.vs_vllm --rounds 1 --requests-per-stream 2 --streams 1,8 --targets colocated \
    --out /tmp/s10/coloc_${th}_$r --json > /tmp/s10/out/coloc_${th}_$r.json 2>/tmp/s10/out/coloc_${th}_$r.err
  echo "$th round $r $(date -u +%T) $(uptime)"
  grep -h '"streams"' /tmp/s10/out/coloc_${th}_$r.err | cut -c1-400
done
done
echo "end $(date -u +%T) $(uptime)"
