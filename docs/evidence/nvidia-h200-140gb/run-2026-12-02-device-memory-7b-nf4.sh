#!/bin/bash
# GPU run T (1 GPU, 2026-12-02): on another lease, (1) run S's injected 3 % slowdown again after garbage is
# collected between a batch size's device timing and the next batch size (its b8 memory figures must now read
# the baselines' own), gated against run Q's baselines; (2) record Llama-2-7B bnb-nf4 (b1, b8) with two
# processes. From the repository root, with the bitsandbytes 0.50.2 wheel under .whl/, started in the
# background (setsid) and watched by a later call:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-02-device-memory-7b-nf4.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run T: injected 3 % again (memory after device timing); record 7B bnb-nf4" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
qb() { name=$1; shift; python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs --results-dir results/$name "$@" \
  > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny
qb injected4 --strict-baselines --inject-device-slowdown 0.03 --methods fp16,bnb-nf4 --models tinyllama-1.1b-arch \
  --batch-sizes 1,8
python3 -c "from harness.models import synthetic_folder; synthetic_folder('llama-2-7b', 0)" >> $R/synthetic.log 2>&1
phase synthetic-7b
qb record-7b-nf4 --update-baselines --processes 2 --methods bnb-nf4 --models llama-2-7b-arch --batch-sizes 1,8
touch $R/DONE
