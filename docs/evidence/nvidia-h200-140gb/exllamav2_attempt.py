"""Import ExLlamaV2 0.3.2 on the device as a user would: its CUDA extension is JIT-compiled by torch's
cpp_extension at first import (there is no prebuilt wheel for torch 2.11 + CUDA 13). Prints what happened and
how long it took; exit code 0 when the extension loaded."""

import sys
import time
import traceback

started = time.perf_counter()
try:
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
    from exllamav2 import ext  # the import builds exllamav2_ext
except Exception as exc:  # noqa: BLE001 - the attempt's record is what failed, whatever it was
    print(f"exllamav2 failed after {time.perf_counter() - started:.1f} s: {type(exc).__name__}: {exc}"[:4000])
    traceback.print_exc()
    sys.exit(1)
print(f"exllamav2 extension loaded in {time.perf_counter() - started:.1f} s: {ext.exllamav2_ext.__file__}")
