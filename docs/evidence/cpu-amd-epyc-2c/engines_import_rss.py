"""Anonymous RSS after the imports a cell's worker makes, with or without torchao, optimum-quanto and hqq importable.

Run: PYTHONPATH=<checkout>[:<folder with the three>] python engines_import_rss.py [gptq]
"""
import sys


def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024


import torch  # noqa: E402,F401

base = anon_mib()
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402,F401
from transformers.models.llama import modeling_llama  # noqa: E402,F401
import transformers.cache_utils  # noqa: E402,F401
after_tf = anon_mib()
loaded = sorted(m for m in ("hqq", "torchao", "optimum.quanto", "termcolor") if m in sys.modules)
if sys.argv[1:] == ["gptq"]:
    import gptqmodel  # noqa: F401
loaded_g = sorted(m for m in ("hqq", "torchao", "optimum.quanto") if m in sys.modules)
print(f"torch {base:.1f} MiB; +transformers/llama/cache_utils {after_tf:.1f} MiB (loaded: {loaded}); "
      f"+{sys.argv[1:]} {anon_mib():.1f} MiB (loaded: {loaded_g})")
