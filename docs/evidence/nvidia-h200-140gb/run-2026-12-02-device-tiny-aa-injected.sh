#!/bin/bash
# GPU run S (1 GPU, 2026-12-02): on another lease, unchanged code against run Q's baselines: an A/A gate of the
# cells run R could not reach (bnb-int8 b1/b8, bnb-nf4-dq b1, bnb-fp4 b1), then a 3 % device slowdown injected
# into every captured step of fp16 and bnb-nf4 (b1, b8), which the gate must fail. From the repository root, with
# the bitsandbytes 0.50.2 wheel under .whl/, started in the background (setsid) and watched by a later call:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-02-device-tiny-aa-injected.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run S: A/A gate of int8, nf4-dq, fp4; injected 3 % against run Q's baselines" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
qb() { name=$1; shift; python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs --strict-baselines \
  --results-dir results/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny
qb aa5-int8 --methods bnb-int8 --models tinyllama-1.1b-arch --batch-sizes 1,8
qb aa5-4bit --methods bnb-nf4-dq,bnb-fp4 --models tinyllama-1.1b-arch --batch-sizes 1
qb injected3 --inject-device-slowdown 0.03 --methods fp16,bnb-nf4 --models tinyllama-1.1b-arch --batch-sizes 1,8
touch $R/DONE
