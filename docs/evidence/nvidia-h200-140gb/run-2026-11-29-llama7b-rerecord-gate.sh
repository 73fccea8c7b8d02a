#!/bin/bash
# GPU run J (1 GPU, 16 cores, 2026-11-29, revision 19c3115): re-record the Llama-2-7B torch cells under memory
# protocol 2, then gate on the same host with --strict-baselines --recheck: first TinyLlama bnb-fp4 (the pair
# run I did not reach), then Llama-2-7B. From the repository root, with the bitsandbytes 0.50.2 wheel under .whl/:
#   bash docs/evidence/nvidia-h200-140gb/run-2026-11-29-llama7b-rerecord-gate.sh
# The device time ended during the Llama-2-7B gate, after 4 of its 8 pairs (fp16, fp16-compiled, bf16,
# bf16-compiled).
TORCH_METHODS=fp16,fp16-compiled,bf16,bf16-compiled,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run J: rerecord llama-2-7b-arch x $TORCH_METHODS; gate tinyllama bnb-fp4, then llama-2-7b-arch" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
python3 -c "from harness.models import synthetic_folder; [synthetic_folder(a, 0) for a in ('llama-2-7b', 'tinyllama-1.1b')]" > $R/synthetic.log 2>&1
phase synthetic
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --results-dir results/rerecord \
  --methods $TORCH_METHODS --models llama-2-7b-arch --update-baselines -rfEs > $R/rerecord.log 2>&1
echo "rerecord rc=$?" >> $R/phases; phase rerecord-done
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --strict-baselines --recheck \
  --results-dir results/gate-tiny --methods bnb-fp4 --models tinyllama-1.1b-arch -rfEs > $R/gate-tiny.log 2>&1
echo "gate-tiny rc=$?" >> $R/phases; phase gate-tiny-done
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --strict-baselines --recheck \
  --results-dir results/gate --methods $TORCH_METHODS --models llama-2-7b-arch -rfEs > $R/gate.log 2>&1
echo "gate rc=$?" >> $R/phases; phase gate-done
touch $R/DONE
