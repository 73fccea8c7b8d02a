#!/bin/bash
# GPU run I (torch only): re-record the cells of METHODS x MODELS under memory protocol 2, then gate the same
# cells on the same host with --strict-baselines --recheck. Run on one H200 (16 cores) from the repository
# root as `bash docs/evidence/nvidia-h200-140gb/run-2026-11-28-protocol2.sh
# fp16,fp16-compiled,bf16,bf16-compiled,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4 tinyllama-1.1b-arch`, with the
# bitsandbytes 0.50.2 wheel under .whl/; the device time ended while the gate ran its last pair (bnb-fp4).
METHODS=${1:-fp16,fp16-compiled,bf16,bf16-compiled,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4}
MODELS=${2:-tinyllama-1.1b-arch,llama-2-7b-arch}
R=/tmp/run; mkdir -p $R; SRC=$PWD
exec > $R/main.log 2>&1
set -x
phase() { echo "$1 $(date +%s) $(date -u +%H:%M:%S)" >> $R/phases; }
phase start
rm -rf /tmp/repo && cp -a $SRC /tmp/repo && cd /tmp/repo && REPO=/tmp/repo && echo $REPO > $R/repo
NGPU=$(nvidia-smi -L | wc -l); NCPU=$(nproc); echo "gpus=$NGPU cpus=$NCPU methods=$METHODS models=$MODELS" >> $R/phases
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
ARCHS=$(python3 -c "import sys; print(' '.join(m.removesuffix('-arch') for m in sys.argv[1].split(',')))" "$MODELS")
python3 -c "import sys; from harness.models import synthetic_folder; [synthetic_folder(a, 0) for a in sys.argv[1:]]" $ARCHS > $R/synthetic.log 2>&1
phase synthetic
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --results-dir results/rerecord \
  --methods $METHODS --models $MODELS --update-baselines -rfEs > $R/rerecord.log 2>&1
echo "rerecord rc=$?" >> $R/phases; phase rerecord-done
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --strict-baselines --recheck \
  --results-dir results/gate --methods $METHODS --models $MODELS -rfEs > $R/gate.log 2>&1
echo "gate rc=$?" >> $R/phases; phase gate-done
touch $R/DONE
