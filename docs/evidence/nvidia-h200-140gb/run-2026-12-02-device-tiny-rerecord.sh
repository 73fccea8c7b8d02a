#!/bin/bash
# GPU run Q (1 GPU, 2026-12-02): re-record TinyLlama's device figures at prefill protocol 2 with --processes 3:
# fp16, bnb-nf4 and bnb-int8 (b1, b8; LLM.int8's step is timed from its kernels' own durations), fp16-compiled (b1),
# then bnb-nf4-dq and bnb-fp4 (b1). From the repository root, with the bitsandbytes 0.50.2 wheel under .whl/,
# started in the background (setsid) and watched by later calls:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-02-device-tiny-rerecord.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run Q: re-record TinyLlama device figures, --processes 3" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
qb() { name=$1; shift; python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs --results-dir results/$name "$@" \
  > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny
qb rerecord-tiny --update-baselines --processes 3 --methods fp16,bnb-nf4 --models tinyllama-1.1b-arch --batch-sizes 1,8
qb rerecord-tiny-compiled --update-baselines --processes 3 --methods fp16-compiled --models tinyllama-1.1b-arch \
  --batch-sizes 1
qb record-tiny-int8 --update-baselines --processes 3 --methods bnb-int8 --models tinyllama-1.1b-arch --batch-sizes 1,8
qb record-tiny-4bit --update-baselines --processes 3 --methods bnb-nf4-dq,bnb-fp4 --models tinyllama-1.1b-arch \
  --batch-sizes 1
touch $R/DONE
