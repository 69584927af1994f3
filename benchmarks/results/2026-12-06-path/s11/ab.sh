#!/bin/sh
# One exclusive hold: main (git archive e38c424) and this branch (git archive of its last commit),
# interleaved main, branch, main, branch; --parts dispatch, 60 requests, 2 rounds each.
PY=/work/main/.venv/bin/python
OUT=/tmp/s11d/ab
for i in 1 2; do
  for side in main branch; do
    if [ $side = main ]; then DIR=/tmp/s11d/before; else DIR=/tmp/s11d/after; fi
    echo "$side-$i start $(date -u +%T) $(cat /proc/loadavg)" >> $OUT/log
    (cd $DIR && PYTHONPATH=$DIR timeout 600 $PY -m benchmarks.overhead --json --parts dispatch --requests 60 --rounds 2 > $OUT/$side-$i.json 2> $OUT/$side-$i.err)
    echo "$side-$i end $(date -u +%T) $(cat /proc/loadavg) rc=$?" >> $OUT/log
  done
done
