"""Where does a CUDA llama.cpp process die? Each variant runs in its own process with faulthandler on.

usage: PYTHONPATH=. python3 docs/evidence/nvidia-h200-140gb/gguf_probe.py GGUF VARIANT
variants: plain | plain-torch | plain-torchcuda | ours | ours-torch | method | method-torch-nvml
"""
import faulthandler
import sys
import time

faulthandler.enable(all_threads=True)
path, variant = sys.argv[1], sys.argv[2]
t0 = time.time()


def say(msg):
    print(f"[probe {variant} {time.time() - t0:6.1f}s] {msg}", flush=True)


if "lcfirst" in variant:
    import llama_cpp  # noqa
if "torch" in variant:
    import torch

    say(f"torch {torch.__version__} imported")
    if "torchcuda" in variant:
        torch.cuda.init()
        say("torch.cuda initialised")

import ctypes

import llama_cpp
import numpy as np

say(f"llama_cpp {llama_cpp.__version__} gpu_offload={llama_cpp.llama_supports_gpu_offload()}")

if variant.startswith("plain") or variant.startswith("ours"):
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = -1
    say("loading")
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    say(f"loaded {bool(model)}")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = 512
    if variant.startswith("ours"):
        cp.n_seq_max = 4
        cp.n_ctx = 4 * 256
        cp.n_batch = cp.n_ubatch = 512
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.n_outputs_max_per_seq = 0
        cp.kv_unified = False
        cp.no_perf = False
    ctx = llama_cpp.llama_init_from_model(model, cp)
    say(f"context {bool(ctx)}")
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    n = 16
    for i in range(n):
        batch.token[i] = 3 + i
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == n - 1
    batch.n_tokens = n
    say(f"decode -> {llama_cpp.llama_decode(ctx, batch)}")
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(1, n_vocab))
    say(f"logits finite={np.isfinite(logits).all()} argmax={int(logits.argmax())}")
    for step in range(8):
        batch.token[0] = int(logits.argmax())
        batch.pos[0] = n + step
        batch.seq_id[0][0] = 0
        batch.logits[0] = 1
        batch.n_tokens = 1
        llama_cpp.llama_decode(ctx, batch)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(1, n_vocab))
    say(f"8 steps ok, perf {llama_cpp.llama_perf_context(ctx).t_eval_ms:.2f} ms")
else:
    sys.path.insert(0, ".")
    from harness.methods.gguf import GGUFMethod

    import os

    method = GGUFMethod({"file": path}, os.environ.get("PROBE_DEVICE", "cuda"))
    method.check_available()
    if "nvml" in variant:
        from harness.measure.memory import track_memory

        with track_memory("cuda", False) as memory:
            model = method.load(path)
        say(f"loaded; memory {memory}")
    else:
        model = method.load(path)
        say("loaded")
    rows = [[3 + i + j for i in range(32)] for j in range(8)]
    method.generate(model, rows, 16, None)
    say(f"generated {model.last_tokens.shape}, perf {model.last_perf}")
    say(f"logits {tuple(method.logits(model, rows[0]).shape)}")
say("OK")
