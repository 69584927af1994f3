#!/bin/sh
# Load check: served TPOT at 1 and 8 streams (+ dispatch) main vs branch, one exclusive hold.
PY=/work/main/.venv/bin/python
OUT=/tmp/s11d/ab2
for side in main branch; do
  if [ $side = main ]; then DIR=/tmp/s11d/before; else DIR=/tmp/s11d/after; fi
  echo "$side start $(date -u +%T) $(cat /proc/loadavg)" >> $OUT/log
  (cd $DIR && PYTHONPATH=$DIR timeout 600 $PY -m benchmarks.overhead --json --parts tpot,dispatch --tokens 64 --requests 60 --rounds 2 > $OUT/tpot-$side.json 2> $OUT/tpot-$side.err)
  echo "$side end $(date -u +%T) $(cat /proc/loadavg) rc=$?" >> $OUT/log
done
