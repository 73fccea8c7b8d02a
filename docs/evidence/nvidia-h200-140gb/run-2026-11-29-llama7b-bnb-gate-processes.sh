#!/bin/bash
# GPU run K (1 GPU, 16 cores, 2026-11-29, revision aa66f02): gate the Llama-2-7B bitsandbytes pairs against their protocol-2 figures, then run
# TinyLlama's compiled pairs as a gate in two processes each (--processes 2), which exercises the GPU
# telemetry and process pooling on a GPU for the first time.
# From the repository root, with the bitsandbytes 0.50.2 wheel under .whl/:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-11-29-llama7b-bnb-gate-processes.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run K: gate llama-2-7b-arch bnb; then tinyllama compiled --processes 2" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
python3 -c "from harness.models import synthetic_folder; [synthetic_folder(a, 0) for a in ('llama-2-7b', 'tinyllama-1.1b')]" > $R/synthetic.log 2>&1
phase synthetic
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --strict-baselines --recheck \
  --results-dir results/gate --methods bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4 --models llama-2-7b-arch -rfEs > $R/gate.log 2>&1
echo "gate rc=$?" >> $R/phases; phase gate-done
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --strict-baselines --processes 2 \
  --results-dir results/processes --methods fp16-compiled,bf16-compiled --models tinyllama-1.1b-arch -rfEs > $R/processes.log 2>&1
echo "processes rc=$?" >> $R/phases; phase processes-done
touch $R/DONE
