#!/bin/bash
# A/B of the colocated worker: $1 = tag; alternates old (shared OMP count) and new
cd /work/main
for r in 0 1; do for v in old new; do
  d=/tmp/s11/ab_$1_${v}_$r; rm -rf $d; mkdir -p $d/st
  if [ $v = old ]; then export S11_OLD=1; else unset S11_OLD; fi
  SPLITSERVE_STEPTRACE_DIR=$d/st PYTHONPATH=$PWD/benchmarks/steptrace:$PWD timeout 900 .venv/bin/python -m benchmarks.vs_vllm --rounds 1 --requests-per-stream 2 --streams 1,8 --targets colocated --out $d/out --json > $d/log 2>&1
  echo "$v $r $(uptime)"; grep '"streams"' $d/log | cut -c1-260
done; done
