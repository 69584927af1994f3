#!/bin/bash
cd /work/main
for r in 0 1; do for v in new hyb; do
  d=/tmp/s11/ab_$1_${v}_$r; rm -rf $d; mkdir -p $d/st
  if [ $v = hyb ]; then export SPLITSERVE_DECODE_THREADS=reserve; else unset SPLITSERVE_DECODE_THREADS; fi
  SPLITSERVE_STEPTRACE_DIR=$d/st PYTHONPATH=$PWD/benchmarks/steptrace:$PWD timeout 900 .venv/bin/python -m benchmarks.vs_vllm --rounds 1 --requests-per-stream 2 --streams 8 --targets colocated --out $d/out --json > $d/log 2>&1
  echo "$v $r $(uptime)"; grep '"streams"' $d/log | cut -c1-260
done; done
