# Sourced by the device run scripts here, from the repository root: log everything under /tmp/run, copy
# the repository to /tmp/repo (the run works there), and record the GPUs and CPUs the run had.
R=/tmp/run; mkdir -p $R; SRC=$PWD
exec > $R/main.log 2>&1
set -x
phase() { echo "$1 $(date +%s) $(date -u +%H:%M:%S)" >> $R/phases; }
phase start
rm -rf /tmp/repo && cp -a $SRC /tmp/repo && cd /tmp/repo && REPO=/tmp/repo && echo $REPO > $R/repo
NGPU=$(nvidia-smi -L | wc -l); NCPU=$(nproc); echo "gpus=$NGPU cpus=$NCPU" >> $R/phases
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.txt
