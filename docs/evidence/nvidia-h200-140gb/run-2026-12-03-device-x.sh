#!/bin/bash
# GPU run X (1 GPU, 2026-12-03): an attempt to load ExLlamaV2 0.3.2 (its CUDA extension JIT-compiled at
# import with the image's nvcc 13), then, if the session's device time allows, optimum-quanto int8 / int4
# weights on the TinyLlama shape recorded as H200 baselines. From the repository root, with the wheels under .whl-x/ (exllamav2 and the packages it
# imports that the image lacks; optimum-quanto, ninja), started in the background (setsid):
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-03-device-x.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run X: quanto; ExLlamaV2 attempt" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-q .whl-x/optimum_quanto-*.whl \
  .whl-x/ninja-*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-x .whl-x/*.whl
export QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
qb() { name=$1; limit=$2; shift 2; timeout $limit python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs \
  --results-dir results/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
PYTHONPATH=/tmp/site-x PATH=/tmp/site-x/bin:/usr/local/cuda/bin:$PATH MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 \
  timeout ${EXL_LIMIT:-170} python3 docs/evidence/nvidia-h200-140gb/exllamav2_attempt.py > $R/exllamav2-attempt.log 2>&1
echo "exllamav2-attempt rc=$?" >> $R/phases; phase exllamav2-done
PYTHONPATH=$REPO python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" \
  > $R/synthetic.log 2>&1
phase synthetic-tiny
PYTHONPATH=/tmp/site-q:$REPO PATH=/tmp/site-q/bin:$PATH qb record-quanto 170 --update-baselines \
  --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods quanto-int8,quanto-int4
touch $R/DONE
