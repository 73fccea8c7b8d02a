"""Convert a Hugging Face folder to EXL2 with ExLlamaV2's own conversion steps, on a CUDA GPU.

Run by harness/exl2.py in a process of its own, with the interpreter of the measured environment:

    python harness/exl2_convert.py JOB.json

It imports nothing from quantbench. It runs the steps of `exllamav2/conversion/convert_exl2.py` (0.3.2) in the
same order, with the same reloads of the model between them, calling the library's functions: calibration
rows, embeddings, measure_quant (on a model reloaded with max_output_len 16), optimize (on a model reloaded
without it), calibration rows again, embeddings, quant, compile_model. It differs from that script in one
place, the calibration. `ids` (what the suite uses) writes the rows of token ids the job names to the
`cal_data.safetensors` file that `conversion.tokenize.tokenize` would write, and sets the job's row counts
as tokenize does: the first `measurement_rows` rows of `measurement_length` ids for the measurement, all rows
of `length` ids for the quantization. So a model without a tokenizer (the suite's synthetic ones) converts,
which the script cannot (it builds ExLlamaV2Tokenizer unconditionally). `library` is the script's default
(tokenize with no dataset: the texts the wheel ships in conversion/standard_cal_data, through the model's
tokenizer, with the architecture's noise rows); it needs pandas and fastparquet, which `tokenize.py` imports.
The script exits 0 after most of its errors (`sys.exit()`); this one raises. ExLlamaV2's own checks inside
the steps (NaN or inf states, a reconstruction error) end the process with `os._exit(1)` after a "##" line.

The job's keys: in_dir, work_dir (the script's out_dir: hidden states, measurement, out_tensor/), out_dir (the
script's compile_full: the EXL2 model), bits, head_bits, calibration ("ids" or "library"), length,
measurement_length, and for "ids" ids_file (a JSON list of rows of ids, all of one length >= length) and
measurement_rows. On stdout, the last line is a JSON record of what was built.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        spec = json.load(handle)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("ExLlamaV2's conversion runs on a CUDA GPU; torch sees none")
    # importing exllamav2 builds its CUDA extension on first use (torch's cpp_extension, nvcc and ninja)
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.conversion.compile import compile_model
    from exllamav2.conversion.measure import embeddings, measure_quant
    from exllamav2.conversion.optimize import optimize
    from exllamav2.conversion.qparams import qparams_headoptions
    from exllamav2.conversion.quantize import quant
    from exllamav2.version import __version__
    from safetensors.torch import save_file

    if spec["head_bits"] not in qparams_headoptions:
        raise SystemExit(f"head_bits {spec['head_bits']} is not one of ExLlamaV2's head options "
                         f"{sorted(qparams_headoptions)}")
    started = time.perf_counter()
    work = spec["work_dir"]
    os.makedirs(os.path.join(work, "out_tensor"), exist_ok=True)
    os.makedirs(spec["out_dir"], exist_ok=True)
    # the keys convert_exl2.py puts in its job, which the steps read (shard_size in MB, as its default)
    job = {"in_dir": spec["in_dir"], "out_dir": work, "cal_dataset": None, "bits": float(spec["bits"]),
           "dataset_rows": 0, "measurement_rows": 0, "length": spec["length"],
           "measurement_length": spec["measurement_length"], "head_bits": spec["head_bits"],
           "shard_size": 8192, "compile_full": spec["out_dir"], "rope_scale": None, "rope_alpha": None,
           "output_measurement": None, "progress": "begin", "status_output": False}
    job_file = os.path.join(work, "job_new.json")

    def save_job() -> None:
        with open(job_file, "w", encoding="utf-8") as handle:
            json.dump(job, handle, indent=1)

    config = ExLlamaV2Config()
    config.model_dir = spec["in_dir"]
    config.prepare()
    config.arch_compat_overrides()
    if spec["length"] > config.max_seq_len or spec["measurement_length"] > config.max_seq_len:
        raise SystemExit(f"calibration rows of {spec['length']} / {spec['measurement_length']} ids exceed the "
                         f"model's max_seq_len {config.max_seq_len}")
    ids = None
    if spec["calibration"] == "ids":
        with open(spec["ids_file"], encoding="utf-8") as handle:
            ids = torch.tensor(json.load(handle), dtype=torch.long)
        if ids.dim() != 2 or ids.shape[1] < max(spec["length"], spec["measurement_length"]):
            raise SystemExit(f"{spec['ids_file']}: expected rows of at least {spec['length']} ids, got shape "
                             f"{list(ids.shape)}")
        if not 1 <= spec["measurement_rows"] <= ids.shape[0]:
            raise SystemExit(f"measurement_rows {spec['measurement_rows']}: the ids file has {ids.shape[0]} rows")
    elif spec["calibration"] != "library":
        raise SystemExit(f"calibration: expected 'ids' or 'library', got {spec['calibration']!r}")

    def calibrate(measure: bool) -> None:
        """What conversion.tokenize.tokenize leaves behind: cal_data.safetensors, cal_filename, the row count."""
        if ids is None:
            from exllamav2 import ExLlamaV2Tokenizer
            from exllamav2.conversion.tokenize import tokenize  # imports pandas and fastparquet

            tokenize(job, save_job, ExLlamaV2Tokenizer(config), measure=measure,
                     noise_rows=config.arch.standard_calib_noise)
            return
        rows = spec["measurement_rows"] if measure else ids.shape[0]
        length = spec["measurement_length"] if measure else spec["length"]
        path = os.path.join(work, "cal_data.safetensors")
        save_file({"input_ids": ids[:rows, :length].contiguous()}, path)
        job["cal_filename"] = path
        job["measurement_rows" if measure else "dataset_rows"] = rows

    def fresh_model(max_output_len: int | None) -> ExLlamaV2:
        config.max_output_len = max_output_len
        model = ExLlamaV2(config)
        model.load(lazy=True)
        return model

    model = fresh_model(None)
    calibrate(measure=True)
    save_job()
    embeddings(job, save_job, model)
    model.unload()
    model = fresh_model(16)  # as convert_exl2.py measures: 16 output positions
    if measure_quant(job, save_job, model, 0) == "interrupted":
        raise SystemExit("ExLlamaV2's measurement pass was interrupted")
    save_job()
    model.unload()
    model = fresh_model(None)
    optimize(job, save_job, model)
    save_job()
    calibrate(measure=False)
    embeddings(job, save_job, model)
    quant(job, save_job, model)
    save_job()
    compile_model(job, save_job, model)
    with open(os.path.join(spec["out_dir"], "config.json"), encoding="utf-8") as handle:
        quantization = json.load(handle).get("quantization_config", {})
    if quantization.get("quant_method") != "exl2":
        raise SystemExit(f"ExLlamaV2 wrote no exl2 quantization_config to {spec['out_dir']}/config.json")
    record = {"exllamav2": __version__, "torch": torch.__version__, "bits": job["bits"],
              "head_bits": job["head_bits"], "calibration": spec["calibration"],
              "dataset_rows": job["dataset_rows"], "measurement_rows": job["measurement_rows"],
              "length": job["length"], "measurement_length": job["measurement_length"],
              "strategy_layers": len(job.get("strategy", {})), "convert_s": time.perf_counter() - started,
              "peak_vram_mib": torch.cuda.max_memory_allocated() / 2**20}
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
