#!/bin/bash
# GPU run P (1 GPU, 2026-12-02): A/A gate of unchanged code against run O's baselines (another lease):
# TinyLlama bf16 (b1, b8), Llama-2-7B bf16 (b1, b8) and bf16-compiled (b1). From the repository root, with the
# bitsandbytes 0.50.2 wheel under .whl/, started in the background (setsid) and watched by later calls:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-02-device-7b-gate.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run P: A/A gate against run O's baselines" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
qb() { name=$1; shift; python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs --strict-baselines \
  --results-dir results/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
qb gate-tiny-bf16 --methods bf16 --models tinyllama-1.1b-arch --batch-sizes 1,8
python3 -c "from harness.models import synthetic_folder; synthetic_folder('llama-2-7b', 0)" >> $R/synthetic.log 2>&1
phase synthetic-7b
qb gate-7b --methods bf16 --models llama-2-7b-arch --batch-sizes 1,8
qb gate-7b-compiled --methods bf16-compiled --models llama-2-7b-arch --batch-sizes 1
touch $R/DONE
