"""ExLlamaV2: the model converted to EXL2 by ExLlamaV2's own conversion, decoded by its CUDA kernels.

The EXL2 folder is built in the prepare process (harness/exl2.py runs ExLlamaV2's conversion steps in a process
of its own, on the suite's calibration ids) and cached; the measured process loads it with `ExLlamaV2Config`,
`ExLlamaV2` and `model.load()` on the first GPU. `generate()` is a greedy loop over `model.forward(ids, cache,
last_id_only=True)`: the prompt rows (one length, as ExLlamaV2's forward takes them) as one prefill into an
`ExLlamaV2Cache` / `_Q8` / `_Q4` of the rows' batch size, then one id per row per step; the argmax runs on the
device and the ids come to the host, where ExLlamaV2 keeps its embedding table (`set_device_map(embed_cpu=True)`)
and looks the next ids up. Exactly `new_tokens` ids per row, no EOS.

Device figures come from the kernels' own durations (torch.profiler, `How.PROFILER`), not a captured graph:
`capture_blocker` says why. Perplexity and divergence: for an fp16 cache one forward over each window without a
cache (full fp16 attention); for a quantized cache token by token through it, the first token as the prefill, as
the suite scores transformers' quantized caches, since a forward over a whole window never reads the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import MatrixError
from harness.methods.base import Method, MethodUnavailable, Param, importable
from harness.runtimes import EngineRuntime

CACHE_TYPES = {"fp16": "ExLlamaV2Cache", "q8": "ExLlamaV2Cache_Q8", "q4": "ExLlamaV2Cache_Q4"}
INSTALL = ("exllamav2 is not installed (install quantbench's 'exllamav2' extra: exllamav2==0.3.2, which builds its "
           "CUDA extension with nvcc at first import)")


def _torch_out_of_memory() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,)


# ExLlamaV2 allocates through torch (weights, its scratch buffers, the cache) and runs on torch streams of its own
# (`set_device_streams`): torch's allocator peak and torch.cuda.synchronize measure it. It runs none of
# transformers' modelling code.
EXLLAMAV2 = EngineRuntime(name="exllamav2", torch_allocator=True, torch_synchronizes=True,
                          torch_in_measured_process=True, runs_transformers_models=False,
                          out_of_memory=_torch_out_of_memory)


@dataclass
class Exl2Model:
    """The loaded ExLlamaV2 model, its config and the caches made for it, one per batch size."""

    model: Any
    config: Any
    folder: Path
    version: str
    vocab: int
    caches: dict[int, Any] = field(default_factory=dict)
    timed_rows: dict[int, tuple[list[list[int]], int]] = field(default_factory=dict)  # last generate() per batch


class ExLlamaV2Method(Method):
    """A model converted to EXL2 and decoded by ExLlamaV2 0.3.2 with an fp16, Q8 or Q4 KV cache."""

    NAME = "exllamav2"
    MARKER = "exllamav2"
    RUNTIME = EXLLAMAV2
    ACCURACY_PACKAGES = ("torch", "exllamav2")
    PARAMS = {
        "bits": Param(float, 4.0, "target bits per weight of the decoder layers (2.0-8.0; ExLlamaV2 mixes group "
                      "bit widths to reach it)"),
        "head_bits": Param(int, 6, "bits of the output head", (2, 3, 4, 5, 6, 8)),
        "cache": Param(str, "fp16", "KV cache: fp16 (ExLlamaV2Cache), q8 (ExLlamaV2Cache_Q8), q4 "
                       "(ExLlamaV2Cache_Q4)", tuple(CACHE_TYPES)),
        "calibration": Param(str, "auto", "as gptq's: auto (corpus text, or seeded random ids for a model without "
                             "tokenizer), corpus, random, a text file, or datasets:NAME[:CONFIG]"),
        "calibration_samples": Param(int, 128, "calibration rows of the quantization pass"),
        "calibration_tokens": Param(int, 512, "ids per calibration row"),
        "measurement_samples": Param(int, 32, "rows (the first calibration rows) of ExLlamaV2's measurement pass"),
    }

    @classmethod
    def validate(cls, params: dict[str, Any], where: str) -> None:
        super().validate(params, where)
        from harness.exl2 import Exl2Error, check_spec

        try:
            check_spec(cls._spec({**{n: p.default for n, p in cls.PARAMS.items()}, **params}))
        except Exl2Error as exc:
            raise MatrixError(f"{where}.{exc}") from None

    @staticmethod
    def _spec(params: dict[str, Any]) -> Any:
        from harness.exl2 import Exl2Spec

        return Exl2Spec(bits=float(params["bits"]), head_bits=params["head_bits"],
                        calibration_samples=params["calibration_samples"],
                        calibration_tokens=params["calibration_tokens"],
                        measurement_samples=params["measurement_samples"])

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        return ("exllamav2",)

    def check_available(self) -> None:
        if not importable("exllamav2"):
            raise MethodUnavailable(INSTALL)
        if self.device != "cuda":
            raise MethodUnavailable("ExLlamaV2 runs on CUDA GPUs only: its kernels are a CUDA extension, with no "
                                    "CPU path")
        super().check_available()
        import shutil

        from torch.utils.cpp_extension import CUDA_HOME

        # exllamav2 0.3.2 builds (or checks) its extension through torch's cpp_extension at every import
        if CUDA_HOME is None:
            raise MethodUnavailable("exllamav2 0.3.2 builds its CUDA extension at import with nvcc, and torch finds "
                                    "no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
        if shutil.which("ninja") is None:
            raise MethodUnavailable("exllamav2 0.3.2 builds its CUDA extension with ninja, which is not on PATH "
                                    "(pip install ninja)")

    def capture_blocker(self) -> str | None:
        return ("ExLlamaV2's forward cannot be captured as one CUDA graph: it looks the ids up in an embedding "
                "table held in host memory and copies the states to the GPU, builds its attention parameters on "
                "the host from cache.current_seq_len (a captured step would replay one position), and switches to "
                "its own CUDA stream (model.forward_chunk: set_device_streams, torch.cuda.set_stream); its kernels' "
                "own durations are read instead")

    def device_timing_unavailable(self) -> str | None:
        return "no timed generate() call of this batch size to profile"

    # ---- the checkpoint ------------------------------------------------------------------------------

    def prepare(self, resolved: Any, seed: int, log: Any) -> dict[str, Any]:
        """Convert (or find in the cache) the EXL2 folder, on the suite's calibration ids."""
        from harness.exl2 import exl2_folder
        from harness.quant import QuantSpec, calibration_ids

        spec = self._spec(self.params)
        tokenizer = None
        if resolved.has_tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolved.pretrained)
        # the same rows GPTQ calibrates on for the same seed and counts
        windows, label = calibration_ids(QuantSpec(calibration=self.params["calibration"],
                                                   calibration_samples=spec.calibration_samples,
                                                   calibration_tokens=spec.calibration_tokens),
                                         tokenizer, resolved.vocab_size, seed)
        log(f"calibration: {len(windows)} x {spec.calibration_tokens} ids from {label}")
        folder, sidecar = exl2_folder(Path(resolved.pretrained), spec, windows, log)
        return {"checkpoint": str(folder), "calibration": label,
                **{k: v for k, v in sidecar.items() if k != "key"}}

    def checkpoint(self) -> Path:
        if not self.prepared or not self.prepared.get("checkpoint"):
            raise MethodUnavailable("the EXL2 folder was not prepared: run the method's prepare step first")
        return Path(self.prepared["checkpoint"])

    def compile_kernels(self, pretrained: str, log: Any) -> dict[str, Any] | None:
        """Import exllamav2's extension once here (built at first import, ~140 s on the H200), so no measured
        load holds the build; a folder converted earlier may meet a machine that never built it."""
        if self.device != "cuda":
            return None
        started = time.perf_counter()
        from exllamav2 import ext  # noqa: F401 - the import builds or loads exllamav2_ext

        seconds = time.perf_counter() - started
        log(f"exllamav2_ext imported in {seconds:.1f} s (built at first import)")
        return {"ext_import_s": seconds}

    # ---- loading ------------------------------------------------------------------------------------

    def load(self, pretrained: str) -> Exl2Model:
        from exllamav2 import ExLlamaV2, ExLlamaV2Config
        from exllamav2.version import __version__

        folder = self.checkpoint()
        config = ExLlamaV2Config(str(folder))  # reads config.json and the tensor files (prepare())
        config.arch_compat_overrides()
        model = ExLlamaV2(config)
        model.load()  # gpu_split None: every module on the first GPU, the embedding table in host memory
        return Exl2Model(model=model, config=config, folder=folder, version=__version__,
                         vocab=config.vocab_size)

    def verify(self, model: Exl2Model, generated: bool) -> None:
        if not model.model.is_quant():
            raise RuntimeError(f"ExLlamaV2 loaded {model.folder} without quantized layers: not an EXL2 model")

    def cache(self, model: Exl2Model, batch_size: int, tokens: int) -> Any:
        """The KV cache of `batch_size` rows, at least `tokens` long, of the `cache` type; made once per batch size
        (in the first, untimed call) and reused, emptied, by each call."""
        import exllamav2

        held = model.caches.get(batch_size)
        if held is None or held.max_seq_len < tokens:
            model.caches.pop(batch_size, None)
            held = getattr(exllamav2, CACHE_TYPES[self.params["cache"]])(model.model, batch_size=batch_size,
                                                                        max_seq_len=tokens)
            model.caches[batch_size] = held
        held.current_seq_len = 0
        return held

    def weights_bytes(self, model: Exl2Model) -> int | None:
        return (self.prepared or {}).get("produced", {}).get("stored_tensor_bytes")

    def logits_dtype(self, model: Exl2Model) -> Any:
        import torch

        return torch.float16  # ExLlamaV2's head returns fp16 logits

    def corrupt_weights(self, model: Exl2Model, fraction: float, seed: int) -> int:
        raise NotImplementedError("ExLlamaV2 keeps its weights packed inside its extension's matrices: the "
                                  "weight-noise gate test does not apply to it")

    # ---- decoding -----------------------------------------------------------------------------------

    def generate(self, model: Exl2Model, rows: list[list[int]], new_tokens: int, streamer: Any) -> None:
        import torch

        length = len(rows[0])
        if any(len(row) != length for row in rows):
            raise ValueError("ExLlamaV2's forward takes a batch of rows of one length")
        hand_over = streamer.put if streamer is not None else lambda ids: None  # no streamer while warming up
        cache = self.cache(model, len(rows), length + new_tokens)
        ids = torch.tensor(rows, dtype=torch.long)  # on the host: ExLlamaV2's embedding table is there
        hand_over(rows)
        produced = 0
        with torch.inference_mode():
            while produced < new_tokens:
                logits = model.model.forward(ids, cache, last_id_only=True)
                ids = logits[:, -1, :].argmax(dim=-1, keepdim=True).cpu()  # the host waits for the step here
                produced += 1
                if self.inject_delay_ms and produced > 1:
                    time.sleep(self.inject_delay_ms / 1000)
                hand_over(ids)
        if cache.current_seq_len != length + new_tokens - 1:
            raise RuntimeError(f"ExLlamaV2's cache holds {cache.current_seq_len} positions after {new_tokens} "
                               f"new tokens of {length}-id prompts; expected {length + new_tokens - 1}")
        model.timed_rows[len(rows)] = (rows, new_tokens)

    def greedy(self, model: Exl2Model, rows: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Any]:
        raise NotImplementedError("ExLlamaV2's model.forward takes a batch of rows of one length (prompts of "
                                  "different lengths are batched by its paged dynamic generator, which this "
                                  "backend does not run)")

    def logits(self, model: Exl2Model, ids: list[int]) -> Any:
        """Float32 logits [len(ids), vocab], position p predicting id p + 1 (module docstring: how)."""
        import torch

        window = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            if self.params["cache"] == "fp16":
                if len(ids) > model.config.max_input_len:
                    raise ValueError(f"a window of {len(ids)} ids is longer than ExLlamaV2's max_input_len "
                                     f"{model.config.max_input_len}")
                return model.model.forward(window, None)[0].float()
            cache = self.cache(model, 1, len(ids))
            steps = [model.model.forward(window[:, i:i + 1], cache)[0, -1].float() for i in range(len(ids))]
            return torch.stack(steps)

    # ---- device time --------------------------------------------------------------------------------

    def engine_timing(self, model: Exl2Model, batch_size: int, repeats: int) -> Any:
        """Device time of the last timed generate()'s rows from the kernels' own durations (How.PROFILER), as
        harness/measure/device.py times a step it cannot capture: PROFILER_SESSIONS sessions of PROFILED_STEPS
        decode steps after the prompt, each step's time scaled to the call's steps; one profiled prefill each."""
        if batch_size not in model.timed_rows:
            return None
        import torch

        from harness.measure.device import PROFILED_STEPS, PROFILER_SESSIONS, DeviceTiming, How, profile_kernels

        rows, new_tokens = model.timed_rows[batch_size]
        steps = new_tokens - 1
        length = len(rows[0])
        prompt = torch.tensor(rows, dtype=torch.long)
        cache = self.cache(model, batch_size, length + new_tokens)
        state: dict[str, Any] = {}

        def prefill() -> None:
            cache.current_seq_len = 0
            state["ids"] = model.model.forward(prompt, cache, last_id_only=True)[:, -1, :].argmax(-1, keepdim=True)

        def step() -> None:
            state["ids"] = model.model.forward(state["ids"].cpu(), cache, last_id_only=True)[:, -1, :].argmax(
                -1, keepdim=True)

        with torch.inference_mode():
            prefill()
            step()  # first step outside the profiles
            prefill()
            _, kernels_per_step, names = profile_kernels(step, 1, True)
            burst_s, prefill_s = [], []
            for _ in range(PROFILER_SESSIONS):
                prefill_s.append(profile_kernels(prefill, 1, True)[0])
                burst_s.append(profile_kernels(step, min(PROFILED_STEPS, steps), True)[0] * steps)
        cache.current_seq_len = 0
        return DeviceTiming(how=How.PROFILER, batch_size=batch_size, prompt_tokens=length, steps=steps,
                            burst_s=tuple(burst_s), prefill_s=tuple(prefill_s), kernels_per_step=kernels_per_step,
                            kernel_names=names,
                            notes={"not_captured": self.capture_blocker(), "cache": CACHE_TYPES[self.params["cache"]],
                                   "host_embedding": "the ids' embedding lookup runs on the host, outside these "
                                                     "kernel durations"})

    # ---- records ------------------------------------------------------------------------------------

    def describe(self, model: Exl2Model) -> dict[str, Any]:
        prepared = self.prepared or {}
        caches = {str(batch): {"max_seq_len": cache.max_seq_len, "bytes": int(sum(cache.footprint()))}
                  for batch, cache in sorted(model.caches.items())}
        return {
            **super().describe(model),
            "exllamav2": model.version, "runtime": self.RUNTIME.name, "checkpoint": str(model.folder),
            "bits": self.params["bits"], "head_bits": self.params["head_bits"],
            "cache_type": CACHE_TYPES[self.params["cache"]], "caches": caches,
            "produced": prepared.get("produced"), "quantization_config": prepared.get("quantization_config"),
            "accuracy_through": "one forward per window, no cache" if self.params["cache"] == "fp16"
            else f"token by token through {CACHE_TYPES[self.params['cache']]}",
            "attention": {"no_flash_attn": bool(model.config.no_flash_attn), "no_xformers": bool(
                model.config.no_xformers), "no_sdpa": bool(model.config.no_sdpa)},
            "batch_consistency": "not checked: equal-length batches only",
        }
