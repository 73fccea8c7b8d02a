#!/bin/bash
# GPU run F: build llama.cpp CUDA alone, GGUF files, token-choice probe, GGUF cells (torch-free measured
# processes), then the torch gate on a quiet host with --recheck, then compiled GPTQ/AWQ.
. "$(dirname "$0")/device-setup.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-gptq/*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1 GPTQMODEL_OFFLINE=1
phase build
( cd /tmp && tar xzf $REPO/.whl/llama_cpp_python-0.3.36-stripped.tar.gz && cd /tmp/llama_cpp_python-0.3.36 && \
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$NCPU \
  python3 -m pip install --no-deps --no-build-isolation --no-cache-dir --target /tmp/site-llama . > $R/llama-build.log 2>&1; echo "build rc=$?" >> $R/phases ) &
BUILD=$!
python3 -c "from harness.models import synthetic_folder; [synthetic_folder(a, 0) for a in ('tinyllama-1.1b', 'llama-2-7b')]" > $R/synthetic.log 2>&1
wait $BUILD; phase built
cp -r /tmp/site-llama/* /tmp/site/
python3 -c "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())" > $R/llama-info.txt 2>&1
gg() {
  python3 -c "
import sys
import torch
from harness.models import synthetic_folder
from harness.gguf import gguf_file
folder = synthetic_folder(sys.argv[1], 0, log=lambda m: None)
for q in sys.argv[2:]:
    print(gguf_file(folder, q, log=lambda m: print(m, file=sys.stderr)))" "$@"
}
GG=$(gg tinyllama-1.1b q8_0 2>>$R/prebuild.log | tail -1)
export -f gg
( taskset -c 16-$((NCPU-1)) bash -c "gg tinyllama-1.1b q4_0 q4_K_M; gg llama-2-7b q8_0 q4_0 q4_K_M" ) >> $R/prebuild.log 2>&1 &
PREBUILD=$!
CUDA_VISIBLE_DEVICES=0 taskset -c 0-7 timeout 150 python3 docs/evidence/nvidia-h200-140gb/gguf_token_choice.py $GG 1 8 32 > $R/token-choice.jsonl 2> $R/token-choice.log
echo "probe rc=$?" >> $R/phases
wait $PREBUILD; phase prebuilt
MATRIX=benchmarks/matrix.toml
if ! grep -q '"token_choice": "device", "batch_size": 32' $R/token-choice.jsonl; then
  python3 -c "
s = open('benchmarks/matrix.toml').read()
for q in ('q8_0', 'q4_0', 'q4_K_M'):
    s = s.replace(f'[methods.gguf-{q}]\\nbackend = \"gguf\"\\nqtype = \"{q}\"\\n', f'[methods.gguf-{q}]\\nbackend = \"gguf\"\\nqtype = \"{q}\"\\ntoken_choice = \"host\"\\n')
open('/tmp/matrix-host.toml', 'w').write(s)"; MATRIX=/tmp/matrix-host.toml
  echo "gguf uses token_choice=host" >> $R/phases
fi
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --matrix $MATRIX --results-dir results/gguf \
  --methods gguf-q8_0,gguf-q4_0,gguf-q4_K_M --update-baselines -rfEs > $R/gguf.log 2>&1
echo "gguf rc=$?" >> $R/phases; phase gguf-done
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --strict-baselines --recheck \
  --results-dir results/gate --methods fp16,fp16-compiled,bf16,bf16-compiled,bnb-int8,bnb-nf4,bnb-nf4-dq,bnb-fp4 \
  -rfEs > $R/gate.log 2>&1
echo "gate rc=$?" >> $R/phases; phase gate-done
python3 -m pytest benchmarks -m gpu -n $NGPU --dist loadgroup -p no:cacheprovider --results-dir results/compiled \
  --methods gptq-4b-g128-compiled,awq-4b-g128-compiled -k "not llama-2-7b" --update-baselines -rfEs > $R/compiled.log 2>&1
echo "compiled rc=$?" >> $R/phases; phase compiled-done
touch $R/DONE
