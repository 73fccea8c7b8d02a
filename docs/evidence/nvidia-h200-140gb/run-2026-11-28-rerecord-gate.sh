#!/bin/bash
# GPU runs G, H and I (torch only): re-record the cells of METHODS x MODELS under the tracker that empties
# the allocator cache (memory protocol 2), then gate GATE_METHODS x MODELS on the same host with
# --strict-baselines --recheck. From the repository root, with the bitsandbytes 0.50.2 wheel under .whl/:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-11-28-rerecord-gate.sh [METHODS [MODELS [GATE_METHODS]]]
# Run G (2 GPUs): no arguments; the machine went back after 6 of the 8 pairs.
# Run H (4 GPUs): `bf16-compiled`.
# Run I (1 GPU, 16 cores): `fp16,fp16-compiled,bf16,bf16-compiled,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4
#   tinyllama-1.1b-arch fp16,fp16-compiled,bf16,bf16-compiled,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4`; the device
#   time ended while the gate ran its last pair (bnb-fp4).
TORCH_METHODS=fp16,fp16-compiled,bf16,bf16-compiled,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4
METHODS=${1:-fp16,fp16-compiled,bf16,bf16-compiled}
MODELS=${2:-tinyllama-1.1b-arch,llama-2-7b-arch}
GATE_METHODS=${3:-$TORCH_METHODS}
. "$(dirname "$0")/device-setup.sh"
echo "methods=$METHODS models=$MODELS gate=$GATE_METHODS" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
ARCHS=$(python3 -c "import sys; print(' '.join(m.removesuffix('-arch') for m in sys.argv[1].split(',')))" "$MODELS")
python3 -c "import sys; from harness.models import synthetic_folder; [synthetic_folder(a, 0) for a in sys.argv[1:]]" $ARCHS > $R/synthetic.log 2>&1
phase synthetic
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --results-dir results/rerecord \
  --methods $METHODS --models $MODELS --update-baselines -rfEs > $R/rerecord.log 2>&1
echo "rerecord rc=$?" >> $R/phases; phase rerecord-done
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --strict-baselines --recheck \
  --results-dir results/gate --methods $GATE_METHODS --models $MODELS -rfEs > $R/gate.log 2>&1
echo "gate rc=$?" >> $R/phases; phase gate-done
touch $R/DONE
