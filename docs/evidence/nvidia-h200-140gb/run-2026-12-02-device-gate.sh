#!/bin/bash
# GPU runs M and N (1 GPU each, 2026-12-02): on leases after run L's, gate unchanged code against run L's
# baselines (aa: fp16, bnb-nf4 at b1, b8; aa-compiled: fp16-compiled at b1), and fp16's cells with a 3 % device
# slowdown injected into every captured step (injected), in the order the arguments name them.
# From the repository root, with the bitsandbytes 0.50.2 wheel under .whl/, started in the background:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-02-device-gate.sh aa injected aa-compiled   # run M
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-02-device-gate.sh injected aa               # run N
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "device gate against run L's baselines: $*" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
qb() { name=$1; shift; python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs --results-dir results/$name "$@" \
  > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny
for step in "$@"; do
  case $step in
    aa) qb gate-aa --strict-baselines --methods fp16,bnb-nf4 --models tinyllama-1.1b-arch --batch-sizes 1,8 ;;
    injected) qb gate-injected --strict-baselines --inject-device-slowdown 0.03 --methods fp16 \
      --models tinyllama-1.1b-arch --batch-sizes 1,8 ;;
    aa-compiled) qb gate-aa-compiled --strict-baselines --methods fp16-compiled --models tinyllama-1.1b-arch \
      --batch-sizes 1 ;;
  esac
done
touch $R/DONE
