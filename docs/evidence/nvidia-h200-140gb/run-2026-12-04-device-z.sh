#!/bin/bash
# GPU run Z (1 GPU, 2026-12-04, the session's last device minutes): vLLM 0.26.0's fp8 KV cache on the H200
# (vllm-bf16-fp8kv, TinyLlama b1 and b8), recorded as an H200 baseline beside run Y's vllm-bf16. The pruned
# vLLM set (.whl-v1 ... .whl-v5, 192 MB; its MANIFEST.txt is vllm-manifest.txt here) was copied into
# /tmp/keep by the calls before this one. Started in the background (setsid) from the repository root:
#   (setsid nohup bash docs/evidence/nvidia-h200-140gb/run-2026-12-04-device-z.sh > /dev/null 2>&1 < /dev/null &)
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run Z: vllm-bf16-fp8kv on vLLM 0.26.0" >> $R/phases
K=/tmp/keep
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
cat $K/vllm-0.26.0-offline.tar.part* > /tmp/vllm-set.tar && sha256sum /tmp/vllm-set.tar >> $R/phases
mkdir -p /tmp/vset && tar xf /tmp/vllm-set.tar -C /tmp/vset
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-vllm /tmp/vset/vllm/*.whl \
  > $R/vllm-install.log 2>&1; echo "vllm-install rc=$?" >> $R/phases
export PYTHONPATH=/tmp/site-vllm:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny
timeout 380 python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs --results-dir results/record-vllm-fp8kv \
  --update-baselines --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods vllm-bf16-fp8kv \
  > $R/record-vllm-fp8kv.log 2>&1; echo "record-vllm-fp8kv rc=$?" >> $R/phases; phase record-vllm-fp8kv-done
touch $R/DONE
