#!/bin/bash
# GPU run O (1 GPU, 2026-12-02): record Llama-2-7B bf16 (b1, b8) and TinyLlama bf16 (b1, b8) device figures
# with --processes 3 (prefill_protocol 2: bursts of 8 prefill replays), and measure the copy bandwidth the
# roofline divides by. From the repository root, with the bitsandbytes 0.50.2 wheel under .whl/, started in
# the background (setsid) and watched by later calls:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-02-device-7b.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run O: record 7B bf16 and TinyLlama bf16 device figures, --processes 3" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
qb() { name=$1; shift; python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs --results-dir results/$name "$@" \
  > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "import sys; from harness.cli import main; sys.exit(main(['bandwidth', '--device', 'cuda']))" > $R/bandwidth.txt 2>&1; phase bandwidth
python3 -c "from harness.models import synthetic_folder; synthetic_folder('llama-2-7b', 0)" > $R/synthetic.log 2>&1
phase synthetic-7b
qb record-7b --update-baselines --processes 3 --methods bf16 --models llama-2-7b-arch --batch-sizes 1,8
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" >> $R/synthetic.log 2>&1
phase synthetic-tiny
qb record-tiny-bf16 --update-baselines --processes 3 --methods bf16 --models tinyllama-1.1b-arch --batch-sizes 1,8
touch $R/DONE
