"""llama.cpp's own llama-bench against the suite's engine-timer device figures, on the same GGUF files.

For each GGUF cell of batch size 1 in the results files given, llama-bench (built from the llama.cpp source
vendored in llama-cpp-python) runs the cell's own file with the cell's settings: every layer offloaded, the
same n_batch / n_ubatch and flash attention setting, a prefill of the cell's prompt length (pp, depth 0) and
the cell's decode steps after that prompt (tg at depth = prompt length), `-r` repeats. The suite's
`decode_device_tokens_per_s` and `prefill_device_tokens_per_s` are llama.cpp's `llama_perf_context` timer
over the cell's timed generate() calls (harness/methods/gguf.py, engine_timing).

    python3 llama_bench_compare.py LLAMA_BENCH OUT.json RESULTS.jsonl [RESULTS.jsonl ...]

Writes OUT.json: one entry per cell with both figures and their relative difference; prints a table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def cells(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            for cell in record.get("results", []):
                if cell.get("batch_size") == 1 and cell["method"].startswith("gguf") and not cell.get("error") \
                        and "decode_device_tokens_per_s" in cell["figures"]:
                    out.append(cell)
    return out


def bench(binary: str, cell: dict, repeats: int) -> dict[str, dict]:
    method, timing = cell["details"]["method"], cell["details"]["device_timing"]
    prompt, steps = cell["config"]["run"]["prompt_tokens"], timing["steps_per_burst"]
    fa = method["flash_attn"] if isinstance(method["flash_attn"], str) else ("on" if method["flash_attn"] else "off")
    common = [binary, "-m", method["file"], "-ngl", "99", "-b", str(method["n_batch"]), "-ub", str(method["n_ubatch"]),
              "-fa", fa, "-r", str(repeats), "-o", "json"]
    runs = {"prefill": [*common, "-p", str(prompt), "-n", "0", "-d", "0"],
            "decode": [*common, "-p", "0", "-n", str(steps), "-d", str(prompt)]}
    out = {}
    for kind, command in runs.items():
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        (row,) = json.loads(done.stdout)
        out[kind] = {"avg_ts": row["avg_ts"], "stddev_ts": row["stddev_ts"], "samples_ts": row.get("samples_ts"),
                     "n_prompt": row["n_prompt"], "n_gen": row["n_gen"], "n_depth": row.get("n_depth"),
                     "flash_attn": row.get("flash_attn"), "build_commit": row.get("build_commit"),
                     "command": " ".join(command[1:])}
    return out


def main(argv: list[str]) -> int:
    binary, out_path, *results = argv
    entries = []
    for cell in cells(results):
        figures = cell["figures"]
        measured = bench(binary, cell, 5)
        entry = {"cell": cell["id"], "method": cell["method"], "model": cell["model"],
                 "file": cell["details"]["method"]["file"], "flash_attn": cell["details"]["method"]["flash_attn"],
                 "gpu": (cell.get("hardware") or {}).get("gpu")}
        for kind, name in (("decode", "decode_device_tokens_per_s"), ("prefill", "prefill_device_tokens_per_s")):
            suite = figures[name]["value"]
            theirs = measured[kind]["avg_ts"]
            entry[kind] = {"suite_tokens_per_s": suite, "suite_spread": figures[name]["spread"],
                           "llama_bench": measured[kind], "relative_difference": (suite - theirs) / theirs}
        entries.append(entry)
        print(f"{cell['id']}: decode suite {entry['decode']['suite_tokens_per_s']:.1f} vs llama-bench "
              f"{measured['decode']['avg_ts']:.1f} +- {measured['decode']['stddev_ts']:.1f} tok/s "
              f"({100 * entry['decode']['relative_difference']:+.2f} %); prefill "
              f"{entry['prefill']['suite_tokens_per_s']:.0f} vs {measured['prefill']['avg_ts']:.0f} "
              f"({100 * entry['prefill']['relative_difference']:+.2f} %)")
    Path(out_path).write_text(json.dumps({"cells": entries}, indent=1) + "\n")
    return 0 if entries else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
