"""Print each measuring process's device and end-to-end decode figures from results files (watching a run)."""

import json
import sys
from pathlib import Path

for path in sorted(p for arg in sys.argv[1:] for p in Path(arg).rglob("*.jsonl")):
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for result in record["results"]:
            figures, timing = result["figures"], result["details"].get("device_timing") or {}
            if result["batch_size"] is None:
                continue
            device = figures.get("decode_device_tokens_per_s", {})
            print(f"{record['role']:8} {result['id']:40} e2e {figures.get('decode_tokens_per_s', {}).get('value', 0):8.1f}"
                  f"  device {device.get('value', 0):8.1f} +-{device.get('spread', 0):6.2f}"
                  f"  prefill {figures.get('prefill_device_tokens_per_s', {}).get('value', 0):9.0f}"
                  f"  {timing.get('how') or timing.get('unavailable') or timing.get('error')}"
                  f"  kernels {timing.get('kernels_per_step')}  err {result.get('error')}")
