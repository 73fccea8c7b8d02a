#!/bin/bash
# GPU runs G and H (torch only): re-record the pairs of the methods in $1 under the tracker that empties the
# allocator cache, then the whole torch gate on a quiet host with --strict-baselines --recheck.
# Run G (2 GPUs) used the default methods and went back after 6 of the 8 pairs; run H (4 GPUs) passed
# bf16-compiled. From the repository root: `bash docs/evidence/nvidia-h200-140gb/run-2026-11-28-rerecord-gate.sh [METHODS]`.
METHODS=${1:-fp16,fp16-compiled,bf16,bf16-compiled}
R=/tmp/run; mkdir -p $R; SRC=$PWD
exec > $R/main.log 2>&1
set -x
phase() { echo "$1 $(date +%s) $(date -u +%H:%M:%S)" >> $R/phases; }
phase start
rm -rf /tmp/repo && cp -a $SRC /tmp/repo && cd /tmp/repo && REPO=/tmp/repo && echo $REPO > $R/repo
NGPU=$(nvidia-smi -L | wc -l); NCPU=$(nproc); echo "gpus=$NGPU cpus=$NCPU" >> $R/phases
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
python3 -c "from harness.models import synthetic_folder; [synthetic_folder(a, 0) for a in ('tinyllama-1.1b', 'llama-2-7b')]" > $R/synthetic.log 2>&1
phase synthetic
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --results-dir results/rerecord \
  --methods $METHODS --update-baselines -rfEs > $R/rerecord.log 2>&1
echo "rerecord rc=$?" >> $R/phases; phase rerecord-done
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --strict-baselines --recheck \
  --results-dir results/gate --methods fp16,fp16-compiled,bf16,bf16-compiled,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4 \
  -rfEs > $R/gate.log 2>&1
echo "gate rc=$?" >> $R/phases; phase gate-done
touch $R/DONE
