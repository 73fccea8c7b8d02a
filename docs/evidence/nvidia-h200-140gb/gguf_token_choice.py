"""Where should generate() choose tokens on a GPU? Host-loop cost against llama.cpp's own decode time.

For one GGUF file, per batch size and token_choice ("device": llama.cpp's greedy sampler in the graph;
"host": logits copied back, numpy argmax): one warm-up generate(), then 3 timed ones, each printed as one JSON
line with the host's and llama.cpp's decode milliseconds per step and their relative difference (what
GGUFMethod.verify() checks against 5 %). Both choices must pick the same ids.

usage: PYTHONPATH=. python3 docs/evidence/nvidia-h200-140gb/gguf_token_choice.py GGUF [BATCH ...]
"""
import json
import statistics
import sys

from harness.methods.gguf import GGUFMethod

path, batches = sys.argv[1], [int(b) for b in sys.argv[2:]] or [1, 8, 32]
rows = [[3 + (7 * i + 13 * j) % 30000 for i in range(128)] for j in range(max(batches))]
chosen = {}
for choice in ("device", "host"):
    method = GGUFMethod({"file": path, "token_choice": choice}, "cuda")
    method.check_available()
    model = method.load(path)
    for batch in batches:
        method.generate(model, rows[:batch], 64, None)  # warm-up: creates the context of this size
        runs = []
        for _ in range(3):
            method.generate(model, rows[:batch], 64, None)
            runs.append(dict(model.last_perf))
        chosen[choice, batch] = model.last_tokens.tolist()
        steps = 63
        print(json.dumps({
            "file": path.rsplit("/", 1)[-1], "token_choice": choice, "batch_size": batch,
            "host_ms_per_step": round(statistics.median(r["host_decode_ms"] for r in runs) / steps, 4),
            "llama_ms_per_step": round(statistics.median(r["llama_decode_ms"] for r in runs) / steps, 4),
            "relative_difference": [round(r["relative_difference"], 4) for r in runs],
            "decode_tokens_per_s": round(batch * steps / statistics.median(r["host_decode_ms"] for r in runs)
                                         * 1000, 1),
        }), flush=True)
for batch in batches:
    print(json.dumps({"batch_size": batch, "same_ids": chosen["device", batch] == chosen["host", batch]}))
