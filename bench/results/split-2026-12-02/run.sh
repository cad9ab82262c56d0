#!/bin/bash
# Before (b425852) and after (main) bench/throughput.py, alternating, fp32, each with its own kernel build dir.
PY=/work/main/.venv/bin/python
for side in before after; do
  dir=/tmp/before; [ $side = after ] && dir=/work/main
  (cd $dir && TORCH_EXTENSIONS_DIR=/tmp/ext_$side $PY -c "from models$([ $side = after ] && echo .fast) import kernels; print(kernels.__name__)")
done
for r in 1 2 3; do
  for side in before after; do
    dir=/tmp/before; [ $side = after ] && dir=/work/main
    echo "== round $r $side $(date +%T)"
    (cd $dir && TORCH_EXTENSIONS_DIR=/tmp/ext_$side $PY bench/throughput.py --precisions=fp32 --json=/tmp/alt/${side}_$r.json)
  done
done
echo done $(date +%T)
