#!/bin/bash
# GPU run U (1 GPU, 2026-12-03): GPTQ and AWQ cells with device figures. Records TinyLlama gptq-4b-g128
# (GPTQModel-quantized on the device), gptq-4b-g128-rtn and awq-4b-g128-rtn (round-to-nearest layouts) at
# b1 and b8 with two processes each, then gptq-4b-g128-compiled at b1 (the compiled cell's kernels a step).
# From the repository root, with the bitsandbytes 0.50.2 wheel under .whl/ and GPTQModel 7.6.0 with what it
# imports under .whl-gptq/ (pypcre built for CPython 3.12), started in the background (setsid) and watched
# by a later call:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-03-device-gptq.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run U: GPTQ/AWQ device figures" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  .whl-gptq/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1 GPTQMODEL_OFFLINE=1 \
  PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
python3 -c "import gptqmodel, pcre; print('gptqmodel', gptqmodel.__version__)" >> $R/phases 2>&1
qb() { name=$1; shift; timeout ${LIMIT:-600} python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs \
  --results-dir results/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny
LIMIT=330 qb record-gptq --update-baselines --processes 2 --models tinyllama-1.1b-arch --batch-sizes 1,8 \
  --methods gptq-4b-g128,gptq-4b-g128-rtn,awq-4b-g128-rtn
LIMIT=120 qb record-gptq-compiled --update-baselines --models tinyllama-1.1b-arch --batch-sizes 1 \
  --methods gptq-4b-g128-compiled
touch $R/DONE
