#!/bin/bash
# GPU run Y (1 GPU, 2026-12-04): on another lease than run W's (GPU-e90d24a6), unchanged code against run W's
# baselines with --processes 3: the A/A gate of GPTQ/AWQ round-to-nearest (Marlin), torchao int4 / fp8 weight-only
# and GGUF q8_0 / q4_0 (llama.cpp's engine timer), TinyLlama b1 and b8; then a 3 % device slowdown injected into
# gptq-4b-g128-rtn's captured steps, which must fail its device decode checks and nothing else; then GGUF with
# token_choice "host" beside "device" against llama-bench on the same files; and vLLM 0.26.0 on the H200
# (bf16, an fp8 KV cache, compressed-tensors W4A16 / W8A8), after torchao's A/A, if its wheels (pruned, in five
# parts, .whl-v1 ... .whl-v5) arrived in /tmp/keep over the calls made while this ran.
# From the repository root with .whl-1/ (GPTQModel 7.6.0 and what it imports, pypcre built for CPython 3.12,
# torchao 0.18.0, termcolor, gguf 0.19.0, diskcache, llama-cpp-0.3.36-pruned.tar.xz), started in the background:
#   (setsid nohup bash docs/evidence/nvidia-h200-140gb/run-2026-12-04-device-y.sh > /dev/null 2>&1 < /dev/null &)
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run Y: A/A --processes 3 of run W's cells; injected 3 % into GPTQ; GGUF token choice; vLLM 0.26.0" >> $R/phases
K=/tmp/keep; mkdir -p $K; cp .whl-1/* $K/
pipt() { target=$1; shift; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $target "$@"; }
pipt /tmp/site $K/gguf-*.whl $K/diskcache-*.whl
pipt /tmp/site-gptq $K/gptqmodel-*.whl $K/pypcre-*.whl $K/logbar-*.whl $K/device_smi-*.whl $K/tokenicer-*.whl \
  $K/defuser-*.whl
pipt /tmp/site-ao $K/torchao-*.whl $K/termcolor-*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases

# llama.cpp with CUDA, built beside the torch cells at low priority (run W's recipe)
L=/tmp/lcp; mkdir -p $L && tar xJf $K/llama-cpp-0.3.36-pruned.tar.xz -C $L
( cd $L && nice -n 10 cmake -S llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
  && nice -n 10 cmake --build build --target llama llama-bench -j 8 \
  && find build -name "*.so*" -exec cp -a {} llama_cpp/lib/ \; ; echo "llama-build rc=$?" >> $R/phases
  phase llama-build-done; touch $R/LLAMA_BUILT ) > $R/llama-build.log 2>&1 &

qb() { name=$1; limit=$2; shift 2; timeout $limit python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs \
  --results-dir results/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny

# A/A: run W's baselines (one process, card e90d24a6) gated by three processes on this card
PYTHONPATH=/tmp/site:/tmp/site-ao:$REPO qb aa-torchao 420 --strict-baselines --processes 3 \
  --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods torchao-int4wo-g128,torchao-fp8wo
# vLLM 0.26.0: its wheels arrive in parts (.whl-v*) over the calls that watch this run
for _ in $(seq 1 36); do [ -f $K/VLLM_PARTS_DONE ] && break; sleep 5; done
if [ -f $K/VLLM_PARTS_DONE ]; then
  cat $K/vllm-0.26.0-offline.tar.part* > /tmp/vllm-set.tar && sha256sum /tmp/vllm-set.tar >> $R/phases && cat $K/SHA256 >> $R/phases
  mkdir -p /tmp/vset && tar xf /tmp/vllm-set.tar -C /tmp/vset && cp /tmp/vset/MANIFEST.txt $R/vllm-manifest.txt
  pipt /tmp/site-vllm /tmp/vset/vllm/*.whl > $R/vllm-install.log 2>&1; echo "vllm-install rc=$?" >> $R/phases
  # llmcompressor in a folder of its own (it pins another compressed-tensors than vLLM), run by the suite
  # as its own interpreter for the W4A16 / W8A8 checkpoints (harness/compressed.py)
  if ls /tmp/vset/llmc/*.whl > /dev/null 2>&1; then pipt /tmp/site-llmc /tmp/vset/llmc/*.whl >> $R/vllm-install.log 2>&1
    export QUANTBENCH_LLMCOMPRESSOR_PYTHON=python3 QUANTBENCH_LLMCOMPRESSOR_PYTHONPATH=/tmp/site-llmc; fi
  PYTHONPATH=/tmp/site:/tmp/site-vllm:$REPO timeout 120 python3 -c "import vllm, torch; print(vllm.__version__, torch.__version__)" \
    > $R/vllm-import.log 2>&1; echo "vllm-import rc=$?" >> $R/phases
  PYTHONPATH=/tmp/site:/tmp/site-vllm:$REPO qb record-vllm 400 \
    --update-baselines --models tinyllama-1.1b-arch --batch-sizes 1,8 \
    --methods vllm-bf16,vllm-bf16-fp8kv,vllm-w4a16-g128,vllm-w8a8
else
  echo "vllm: parts did not arrive" >> $R/phases
fi

PYTHONPATH=/tmp/site:/tmp/site-gptq:$REPO GPTQMODEL_OFFLINE=1 MAX_JOBS=8 qb aa-gptq-awq 600 --strict-baselines \
  --processes 3 --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods gptq-4b-g128-rtn,awq-4b-g128-rtn
# the same GPTQ cell, every captured step slowed by 3 % (one process)
PYTHONPATH=/tmp/site:/tmp/site-gptq:$REPO GPTQMODEL_OFFLINE=1 qb injected-gptq 240 --strict-baselines \
  --inject-device-slowdown 0.03 --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods gptq-4b-g128-rtn

# GGUF on llama.cpp's CUDA build (the measured process never imports torch)
for _ in $(seq 1 90); do [ -f $R/LLAMA_BUILT ] && break; sleep 5; done
export LD_LIBRARY_PATH=$L/llama_cpp/lib
PYTHONPATH=/tmp/site:$L:$REPO qb aa-gguf 300 --strict-baselines --processes 3 \
  --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods gguf-q4_0,gguf-q8_0
# token choice on the host beside the device sampler: the same files, a matrix with two more entries
python3 - <<'EOF' > $R/matrix-host.log 2>&1
import re
text = open("benchmarks/matrix.toml").read()
extra = "".join(f'\n[methods.gguf-{q}-hosttoken]\nbackend = "gguf"\nqtype = "{q}"\ntoken_choice = "host"\n'
                for q in ("q8_0", "q4_0"))
text = text.replace('"gguf-q8_0", "gguf-q4_0", "gguf-q4_K_M", "gguf-model-file",',
                    '"gguf-q8_0", "gguf-q4_0", "gguf-q4_K_M", "gguf-model-file", "gguf-q8_0-hosttoken", '
                    '"gguf-q4_0-hosttoken",', 1)
open("/tmp/matrix-host.toml", "w").write(text + extra)
print("hosttoken entries:", text.count("hosttoken"))
EOF
PYTHONPATH=/tmp/site:$L:$REPO qb gguf-hosttoken 200 --matrix /tmp/matrix-host.toml \
  --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods gguf-q4_0-hosttoken,gguf-q8_0-hosttoken
timeout 200 python3 docs/evidence/nvidia-h200-140gb/llama_bench_compare.py $L/build/bin/llama-bench \
  $R/llama-bench-compare.json results/aa-gguf/*.jsonl results/gguf-hosttoken/*.jsonl > $R/llama-bench-compare.log 2>&1
phase llama-bench-done
unset LD_LIBRARY_PATH

touch $R/DONE
