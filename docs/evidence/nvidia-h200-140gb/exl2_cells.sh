#!/bin/bash
# GPU run (1 GPU; NOT run yet): the ExLlamaV2 0.3.2 cells (exl2-4.0bpw with fp16, Q8 and Q4 KV caches) on the
# TinyLlama shape, recorded as H200 baselines over three processes. The first import of exllamav2 (in the
# conversion's process) JIT-builds its extension with the image's nvcc 13 (~140 s, run X); the EXL2 folder is
# converted once, on the suite's calibration ids, and shared by the three methods.
# From the repository root, with these wheels under .whl-exl2/ (exllamav2 and what it imports that the image
# lacks, as run X installed them; ninja builds the extension):
#   exllamav2-0.3.2-py3-none-any.whl, ninja-1.13.2 (manylinux2014), fastparquet-2026.9.0 (cp312), cramjam-2.14.0
#   (cp312), websockets-17.4 (cp312), rich-15.0.0, markdown_it_py-4.3.0, mdurl-0.1.2, pygments-2.21.0,
#   fsspec-2026.9.0
# fetched with `pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64
# -d .whl-exl2 ...`. A device call lasts 10 minutes at most and this run longer: start it in the background and
# poll /tmp/run/phases for DONE:
#   setsid bash docs/evidence/nvidia-h200-140gb/exl2_cells.sh > /dev/null 2>&1 < /dev/null &
. docs/evidence/nvidia-h200-140gb/device-setup.sh
echo "run: ExLlamaV2 0.3.2 cells" >> $R/phases
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-exl2 .whl-exl2/*.whl
phase installed
export QUANTBENCH_CACHE=/tmp/qbcache PYTHONUNBUFFERED=1
# ninja from the wheel, nvcc from the image; the extension for sm_90 only, on every core
export PYTHONPATH=/tmp/site-exl2:$REPO PATH=/tmp/site-exl2/bin:/usr/local/cuda/bin:$PATH MAX_JOBS=16 \
  TORCH_CUDA_ARCH_LIST=9.0
nvidia-smi --query-gpu=uuid,clocks.max.sm,clocks.max.mem --format=csv,noheader >> $R/phases
python3 -c "import exllamav2, sys; print('exllamav2', exllamav2.__version__, exllamav2.__file__)" \
  >> $R/phases 2>&1 || echo "exllamav2 import failed (see main.log)" >> $R/phases
timeout ${EXL2_LIMIT:-1500} python3 -m pytest benchmarks -m gpu -p no:cacheprovider -rfEs --update-baselines \
  --processes 3 --models tinyllama-1.1b-arch --batch-sizes 1,8 \
  --methods exl2-4.0bpw,exl2-4.0bpw-q8cache,exl2-4.0bpw-q4cache --results-dir results/exl2 > $R/exl2.log 2>&1
echo "exl2 rc=$?" >> $R/phases; phase exl2-done
# the conversion's own log (kept beside the cached folder) and the folder's record
cp /tmp/qbcache/exl2/*.convert.log /tmp/qbcache/exl2/*/quantbench.json $R/ 2>/dev/null
cp -r results/exl2 $R/results-exl2 2>/dev/null
git -C $REPO status --short baselines > $R/baselines-changed.txt
touch $R/DONE
