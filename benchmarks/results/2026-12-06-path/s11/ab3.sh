#!/bin/sh
PY=/work/main/.venv/bin/python
OUT=/tmp/s11d/ab3
for side in main branch main branch; do
  if [ $side = main ]; then DIR=/tmp/s11d/before; else DIR=/tmp/s11d/after; fi
  echo "$side start $(date -u +%T) $(cat /proc/loadavg)" >> $OUT/log
  (cd $DIR && PYTHONPATH=$DIR timeout 400 $PY benchmarks/results/2026-12-06-path/s11/loaded.py >> $OUT/$side.jsonl 2>> $OUT/$side.err)
  echo "$side end $(date -u +%T) $(cat /proc/loadavg) rc=$?" >> $OUT/log
done
echo done >> $OUT/log
