# Sourced by a device call after a run script was started in the background: wait up to $1 seconds for
# /tmp/run/DONE, then show the phases and log tails and pack the run's logs, results and the baselines the
# run wrote into $OUT/run.tgz.
for _ in $(seq 1 $(( ${1:-540} / 10 ))); do [ -f /tmp/run/DONE ] && break; sleep 10; done
cat /tmp/run/phases; python3 docs/evidence/nvidia-h200-140gb/device_figures.py /tmp/repo/results 2>&1 | tail -30; for f in /tmp/run/*.log; do echo "== $f"; grep -E "passed|failed|error|device decode|Error" $f | tail -6; done
tar czf $OUT/run.tgz -C / tmp/run $(cd / && ls -d tmp/repo/results tmp/repo/baselines/nvidia-h200-140gb 2>/dev/null)
