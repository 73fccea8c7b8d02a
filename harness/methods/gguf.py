"""llama.cpp through llama-cpp-python: GGUF files, converted and quantized here or given, decoded in batches.

Every row of a batch is its own llama.cpp sequence, and each decode step is one `llama_decode` of all rows
(the high-level `Llama` class decodes one sequence only). The context is created at load for one sequence
and recreated, never the model, when a call needs more sequences or a longer context than it has; in the
suite that happens in a batch size's first warm-up run, outside the timed region.

In `generate()` the next token is chosen the way torch's `generate` chooses it, on the device: llama.cpp's
greedy sampler runs inside the decode graph (backend sampling, `llama_context_params.samplers`) and only the
ids come back, not a [rows, vocab] block of logits for numpy's argmax (`token_choice = "host"` does that).
Perplexity and the batch-consistency check read raw logits from a context without samplers; the two kinds
of context are recreated when a call needs the other, which in the suite happens in warm-up runs.

After each `generate()` the method reads llama.cpp's own counters (`llama_perf_context`) and `verify()`
fails the batch size when llama.cpp's decode time and the host's decode time, measured the way the suite
measures it, differ by more than the `perf_tolerance` parameter (5 %): a cross-check that the suite's
timing of this engine measures the engine.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from harness.cache import file_sha256
from harness.config import MatrixError
from harness.gguf import GGUFError, _quiet_llama_cpp, check_gguf, gguf_file, read_sidecar
from harness.measure.device import DeviceTiming, How
from harness.methods.base import Method, MethodUnavailable, Param, check_engine_timer
from harness.runtimes import NATIVE

CONTEXT_ROUND = 256  # per-sequence context sizes are rounded up to this, so small changes reuse the context
# Batch consistency on a GPU (Method.consistency_tolerance): llama.cpp's CUDA backend picks its matrix kernels by
# the number of tokens in a step (a vector kernel for a few, tiled int8 kernels or dequantize + cuBLAS for more;
# ggml-org/llama.cpp#3014), so a row decoded beside others is computed differently from the row alone. On the
# H200 the first divergent step of TinyLlama-1.1B and Llama-2-7B (synthetic) x q8_0, q4_0, q4_K_M moved the
# batched logits by 0.15-1.02 standard deviations; a row fed its neighbour's token (a batching bug) moves them
# by 2.4-4.8 on the CPU (tests/test_gguf.py). On the CPU llama.cpp is batch-invariant and the default holds.
CUDA_CONSISTENCY_TOLERANCE = 1.5


@dataclass
class GGUFModel:
    """A loaded GGUF model: llama.cpp's model and context handles, and what was measured about them."""

    path: Path
    source: Path | None  # the Hugging Face folder it was converted from, or beside which it was given
    sidecar: dict[str, Any]  # size, sha256 and conversion/quantization wall times of a cached file
    vocab_kind: str  # "sentencepiece", "placeholder", or "file" for a given GGUF without the suite's marker
    llama_model: Any
    vocab: Any
    n_vocab: int
    n_gpu_layers: int
    context: Any = None
    n_seq_max: int = 0
    n_ctx_seq: int = 0
    batch: Any = None
    batch_capacity: int = 0
    tokens: Any = None  # numpy views of the batch's arrays
    positions: Any = None
    n_seq_ids: Any = None
    outputs: Any = None
    seq_ids: Any = None  # the sequence id last written to each batch slot
    samplers: list[Any] = field(default_factory=list)  # the context's sampler chains, kept alive for llama.cpp
    last_perf: dict[str, float] | None = None  # llama.cpp's counters and the host's timing of the last generate()
    perf_unverified: list[dict[str, float]] = field(default_factory=list)  # since the last verify()
    perf_history: list[dict[str, float]] = field(default_factory=list)  # every generate()'s counters, in order
    tokenizer_parity: dict[str, Any] | None = None
    last_tokens: Any = None  # [rows, new_tokens] ids chosen by the last generate()

    @property
    def sampled(self) -> bool:
        """The context runs a greedy sampler per sequence (token_choice "device")."""
        return bool(self.samplers)

    @property
    def device(self) -> str:
        return "cpu" if self.n_gpu_layers == 0 else "cuda"


class GGUFMethod(Method):
    """A GGUF file run by llama.cpp: f16 or one of llama.cpp's quantization types, on CPU or offloaded to GPU."""

    NAME = "gguf"
    RUNTIME = NATIVE  # llama.cpp has its own CUDA runtime and allocator: torch never touches the GPU
    MARKER = "gguf"
    # torch and transformers read the weights the converter writes; gguf writes the file, llama.cpp quantizes
    # and runs it
    ACCURACY_PACKAGES = (*Method.ACCURACY_PACKAGES, "gguf", "llama-cpp-python")
    PARAMS = {
        "qtype": Param(str, "q4_K_M", "llama.cpp quantization type of the converted file",
                       ("f16", "q8_0", "q4_0", "q4_K_M", "q5_K_M")),
        "file": Param(str, "", "an existing .gguf file to benchmark as is, instead of converting the model"),
        "model_file": Param(bool, False, "benchmark the model's own GGUF file as it is (a model of source gguf, "
                            "e.g. the file a package ships), instead of re-quantizing its dequantized weights"),
        "n_gpu_layers": Param(int, -1, "layers offloaded to the GPU (-1: all); forced to 0 on the CPU"),
        "flash_attn": Param(str, "auto", "llama.cpp's flash attention: 'auto' (llama.cpp's default and "
                            "llama-bench's: on where the device's kernels support the cache's types), 'on', 'off'",
                            ("auto", "on", "off")),
        "n_batch": Param(int, 512, "most tokens per llama_decode call (longer prompts are split)"),
        "n_ubatch": Param(int, 512, "most tokens per physical batch inside llama.cpp"),
        "n_threads": Param(int, 0, "CPU threads for decode and prefill (0: llama.cpp's default, 4)"),
        "token_choice": Param(str, "device", "where generate() picks each next token: 'device' runs "
                              "llama.cpp's greedy sampler in the decode graph and returns ids, as torch's "
                              "generate does; 'host' copies the logits back and takes numpy's argmax",
                              ("device", "host")),
        "perf_tolerance": Param(float, 0.05, "verify(): largest relative difference between llama.cpp's own "
                                "decode time and the suite's; the host loop costs ~40 us a step, so models "
                                "whose steps take well under a millisecond need more"),
    }

    @classmethod
    def validate(cls, params: dict[str, Any], where: str) -> None:
        super().validate(params, where)
        if params.get("model_file") and params.get("file"):
            raise MatrixError(f"{where}.model_file: benchmarks the model's own GGUF file; 'file' names another one")
        if (params.get("model_file") or params.get("file")) and "qtype" in params:
            raise MatrixError(f"{where}.qtype: a given GGUF file is benchmarked as it is, never quantized")

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        return ("llama_cpp", "gguf")

    def check_available(self) -> None:
        super().check_available()
        if self.device == "cuda":
            import llama_cpp

            if not llama_cpp.llama_supports_gpu_offload():
                raise MethodUnavailable("llama-cpp-python was built without GPU offload (rebuild it with "
                                        "CMAKE_ARGS=\"-DGGML_CUDA=on\")")

    def device_timing_unavailable(self) -> str | None:
        return ("llama.cpp runs its own decode loop: its device figures come from its own C++ timer "
                "(engine_timing), which had no timed generate() of this batch size to read")

    def engine_timing(self, model: GGUFModel, batch_size: int, repeats: int) -> DeviceTiming | None:
        """llama.cpp's own C++ timer (`llama_perf_context`) over the last `repeats` timed generate() calls of
        `batch_size` rows: the time inside llama_decode (graph build, kernels, the wait for them), not the
        suite's Python loop around it, which is what llama-bench times."""
        calls = [c for c in model.perf_history if c["batch_size"] == batch_size and c["new_tokens"] > 1][-repeats:]
        if len(calls) < repeats:
            return None
        return DeviceTiming(how=How.ENGINE_TIMER, batch_size=batch_size, prompt_tokens=int(calls[0]["prompt_tokens"]),
                            steps=int(calls[0]["new_tokens"]) - 1,
                            burst_s=tuple(c["llama_decode_ms"] / 1000 for c in calls),
                            prefill_s=tuple(c["prefill_ms"] / 1000 for c in calls),
                            notes={"timer": "llama_perf_context (t_eval_ms + t_p_eval_ms after the first token; "
                                            "t_p_eval_ms + t_eval_ms up to it)",
                                   "flash_attn": self.params["flash_attn"]})

    def consistency_tolerance(self) -> float:
        return CUDA_CONSISTENCY_TOLERANCE if self.device == "cuda" else super().consistency_tolerance()

    def n_gpu_layers(self) -> int:
        """Layers to offload: none on the CPU, whatever the parameter says."""
        return 0 if self.device == "cpu" else self.params["n_gpu_layers"]

    # ---- loading ------------------------------------------------------------------------------------

    def prepare(self, resolved: Any, seed: int, log: Any) -> dict[str, Any]:
        """Convert and quantize (or find in the cache) the GGUF file in the prepare process.

        The measured process then only loads it: its load time and memory hold no conversion, and it never
        reads the Hugging Face weights. The conversion's wall times go to the cell's details.
        """
        path = self._model_file(resolved) if self.params["model_file"] else self._gguf_path(resolved.pretrained)
        sidecar = read_sidecar(path)
        return {"file": str(path), **{k: sidecar[k] for k in ("convert_s", "quantize_s") if k in sidecar}}

    def _model_file(self, resolved: Any) -> Path:
        """The GGUF file a model of source gguf was made from (harness/gguf_model.py), checked."""
        provenance = resolved.provenance
        if provenance.get("source") != "gguf":
            raise MethodUnavailable(f"model_file benchmarks a model's own GGUF file; {resolved.name} has none "
                                    f"(source {provenance.get('source')})")
        path = Path(provenance["path"])
        check_gguf(path)
        return path

    def _gguf_path(self, pretrained: str) -> Path:
        if self.params["model_file"]:
            raise GGUFError("model_file: the model's own GGUF file is found when the method is prepared "
                            "(prepare(resolved, ...)); this method was loaded without it")
        if self.params["file"]:
            path = Path(self.params["file"]).expanduser()
            check_gguf(path)
            return path
        if not Path(pretrained).is_dir():
            raise GGUFError(f"{pretrained!r} is not a local folder: the gguf backend converts embedded, "
                            "synthetic and local models; give a ready .gguf with the 'file' parameter")
        return gguf_file(Path(pretrained), self.params["qtype"], log=_log)

    def load(self, pretrained: str) -> GGUFModel:
        import llama_cpp

        _quiet_llama_cpp()
        llama_cpp.llama_backend_init()
        folder = Path(pretrained) if Path(pretrained).is_dir() else None
        if self.prepared and self.prepared.get("file"):
            path = Path(self.prepared["file"])
            check_gguf(path)  # the prepare process left it complete; a change since is caught here
        else:
            path = self._gguf_path(pretrained)
        sidecar = read_sidecar(path)
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = self.n_gpu_layers()
        llama_model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not llama_model:
            raise GGUFError(f"llama.cpp could not load {path} (its log above says why)")
        vocab = llama_cpp.llama_model_get_vocab(llama_model)
        kind = _meta(llama_model, "quantbench.vocab") or "file"
        model = GGUFModel(path=path, source=folder, sidecar=sidecar, vocab_kind=kind, llama_model=llama_model,
                          vocab=vocab, n_vocab=llama_cpp.llama_vocab_n_tokens(vocab),
                          n_gpu_layers=self.n_gpu_layers())
        self._ensure_context(model, n_seq=1, n_ctx_seq=CONTEXT_ROUND)
        return model

    def weights_bytes(self, model: GGUFModel) -> int | None:
        import llama_cpp

        return int(llama_cpp.llama_model_size(model.llama_model))

    def corrupt_weights(self, model: GGUFModel, fraction: float, seed: int) -> int:
        """llama.cpp holds the weights where torch cannot reach them: a broken quantizer cannot be faked here."""
        raise ValueError("--inject-weight-noise: llama.cpp holds a GGUF model's weights outside torch, so they "
                         "cannot be corrupted in memory; choose a torch-side method (--methods)")

    def _ensure_context(self, model: GGUFModel, n_seq: int, n_ctx_seq: int, sampled: bool = False) -> None:
        """Make the context hold `n_seq` sequences of `n_ctx_seq` tokens each, with a greedy sampler per
        sequence when `sampled` (else raw logits); recreate it if it is smaller or of the other kind."""
        if (model.context is not None and n_seq <= model.n_seq_max and n_ctx_seq <= model.n_ctx_seq
                and sampled == model.sampled):
            return
        import llama_cpp
        import numpy as np

        n_seq = max(n_seq, model.n_seq_max)
        n_ctx_seq = -(-max(n_ctx_seq, model.n_ctx_seq) // CONTEXT_ROUND) * CONTEXT_ROUND
        _free_context(model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_seq_max = n_seq
        params.n_batch = self.params["n_batch"]
        params.n_ubatch = self.params["n_ubatch"]
        if self.params["n_threads"]:
            params.n_threads = params.n_threads_batch = self.params["n_threads"]
        params.flash_attn_type = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                  "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[self.params["flash_attn"]]
        params.n_outputs_max_per_seq = 0  # every position of a window has logits (perplexity)
        params.kv_unified = False  # one KV stream per row: rows share no prefix
        params.no_perf = False  # llama.cpp only keeps its timings when asked
        if sampled:  # llama.h: backend samplers are chains, one per sequence, alive as long as the context
            config = (llama_cpp.llama_sampler_seq_config * n_seq)()
            for seq in range(n_seq):
                chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
                model.samplers.append(chain)
                config[seq].seq_id = seq
                config[seq].sampler = ctypes.cast(chain, ctypes.c_void_p)
            params.samplers, params.n_samplers = config, n_seq
            params.n_outputs_max_per_seq = 1  # a generate() step outputs one token per sequence
        context = llama_cpp.llama_init_from_model(model.llama_model, params)
        if not context:
            _free_samplers(model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_seq} sequences x {n_ctx_seq} "
                               f"tokens{' with a greedy sampler each' if sampled else ''} for {model.path}")
        model.context, model.n_seq_max, model.n_ctx_seq = context, n_seq, n_ctx_seq
        capacity = llama_cpp.llama_n_batch(context)
        model.batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        model.batch_capacity = capacity
        model.tokens = np.ctypeslib.as_array(model.batch.token, shape=(capacity,))
        model.positions = np.ctypeslib.as_array(model.batch.pos, shape=(capacity,))
        model.n_seq_ids = np.ctypeslib.as_array(model.batch.n_seq_id, shape=(capacity,))
        model.outputs = np.ctypeslib.as_array(model.batch.logits, shape=(capacity,))
        model.n_seq_ids[:] = 1
        model.seq_ids = np.full(capacity, -1, dtype=np.int32)

    # ---- decoding -----------------------------------------------------------------------------------

    def _decode(self, model: GGUFModel, tokens: Any, positions: Any, seqs: Any, outputs: Any) -> Any:
        """Run tokens through llama_decode in chunks of n_batch; return what each output token gives.

        That is the logits, a float32 array [number of outputs, vocab], or in a sampled context the ids the
        sampler chose, an int32 array [number of outputs]; both in the tokens' order.
        """
        import numpy as np

        capacity = model.batch_capacity
        parts = []
        for start in range(0, len(tokens), capacity):
            stop = min(start + capacity, len(tokens))
            k = stop - start
            model.tokens[:k] = tokens[start:stop]
            model.positions[:k] = positions[start:stop]
            model.outputs[:k] = outputs[start:stop]
            # seq_id is an array of pointers: write only the slots whose sequence changed
            for j in np.flatnonzero(model.seq_ids[:k] != seqs[start:stop]).tolist():
                model.batch.seq_id[j][0] = int(seqs[start + j])
                model.seq_ids[j] = seqs[start + j]
            model.batch.n_tokens = k
            if model.sampled:
                parts.append(self._run_sampled(model, np.flatnonzero(outputs[start:stop]).tolist()))
            else:
                parts.append(self._run(model, int(np.count_nonzero(outputs[start:stop]))).copy())
        return np.concatenate(parts)

    def _run(self, model: GGUFModel, n_outputs: int) -> Any:
        """llama_decode the batch as filled; a view [n_outputs, vocab] of its logits, valid until the next run.

        llama.h: the logits of the tokens marked for output are stored contiguously, in batch order, so one
        `llama_get_logits` call reads them all (one `llama_get_logits_ith` per row costs a call per row).
        """
        import llama_cpp
        import numpy as np

        self._llama_decode(model)
        if n_outputs == 0:
            return np.empty((0, model.n_vocab), dtype=np.float32)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(model.context), shape=(n_outputs, model.n_vocab))

    def _run_sampled(self, model: GGUFModel, slots: Any) -> Any:
        """llama_decode the batch as filled, in a sampled context; the ids chosen for the given batch slots."""
        import llama_cpp
        import numpy as np

        self._llama_decode(model)
        sampled = llama_cpp.llama_get_sampled_token_ith
        ids = np.array([sampled(model.context, slot) for slot in slots], dtype=np.int32)
        if len(ids) and ids.min() < 0:
            raise RuntimeError(f"llama.cpp's backend sampler returned no token for {model.batch.n_tokens} tokens "
                               f"({model.path}); its log says why. token_choice = \"host\" picks tokens "
                               "from the logits instead")
        return ids

    def _llama_decode(self, model: GGUFModel) -> None:
        import llama_cpp

        status = llama_cpp.llama_decode(model.context, model.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for {model.batch.n_tokens} tokens "
                               f"({model.path}); 1 means no KV cache slot was free")

    def _clear(self, model: GGUFModel) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(model.context), True)

    def generate(self, model: GGUFModel, rows: list[list[int]], new_tokens: int, streamer: Any) -> None:
        self._greedy(model, rows, new_tokens, streamer, scores=None)

    def greedy(self, model: GGUFModel, rows: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Any]:
        """Greedy ids and per-step scores for prompts of different lengths: each row is its own sequence,
        so nothing is padded."""
        import numpy as np

        scores = np.empty((len(rows), new_tokens, model.n_vocab), dtype=np.float32)
        ids = self._greedy(model, rows, new_tokens, None, scores=scores)
        return ids.tolist(), scores

    def _greedy(self, model: GGUFModel, rows: list[list[int]], new_tokens: int, streamer: Any,
                scores: Any) -> Any:
        """Decode all rows together, one llama_decode per step; return the ids [rows, new_tokens].

        `scores`, when given, receives each step's logits; otherwise llama.cpp's counters are recorded for
        the cross-check (the timed path keeps nothing it does not need) and the `token_choice` parameter
        says where tokens are chosen.
        """
        import llama_cpp
        import numpy as np

        n_rows = len(rows)
        lengths = np.array([len(row) for row in rows], dtype=np.int32)
        sampled = scores is None and self.params["token_choice"] == "device"
        self._ensure_context(model, n_seq=n_rows, n_ctx_seq=int(lengths.max()) + new_tokens, sampled=sampled)
        self._clear(model)
        flat = np.concatenate([np.asarray(row, dtype=np.int32) for row in rows])
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
        seqs = np.arange(n_rows, dtype=np.int32)
        last = np.zeros(len(flat), dtype=np.int8)
        last[np.cumsum(lengths) - 1] = 1  # prefill needs the logits of each row's last prompt token only
        chosen = np.zeros((new_tokens, n_rows), dtype=np.int32)  # step-major: each step's ids are contiguous
        delay_s = self.inject_delay_ms / 1000
        one_call = n_rows <= model.batch_capacity
        step_positions = model.positions[:n_rows]
        step_tokens = model.tokens[:n_rows]
        row_slots = range(n_rows)

        llama_cpp.llama_perf_context_reset(model.context)
        if streamer is not None:
            streamer.put(flat)
        first = self._decode(model, flat, positions, np.repeat(seqs, lengths), last)
        chosen[0] = first if sampled else first.argmax(axis=1)
        if scores is not None:
            scores[:, 0] = first
        if delay_s:
            time.sleep(delay_s)
        if streamer is not None:
            streamer.put(chosen[0])
        first_token_at = time.perf_counter()
        after_prefill = llama_cpp.llama_perf_context(model.context)
        if one_call:  # every step below is one llama_decode of all rows: set the fixed fields once
            model.outputs[:n_rows] = 1
            self._decode_setup(model, seqs)
        for step in range(1, new_tokens):
            if one_call:
                step_tokens[:] = chosen[step - 1]
                step_positions[:] = lengths + (step - 1)
                out = self._run_sampled(model, row_slots) if sampled else self._run(model, n_rows)
            else:
                out = self._decode(model, chosen[step - 1], lengths + (step - 1), seqs, np.ones(n_rows, np.int8))
            chosen[step] = out if sampled else out.argmax(axis=1)
            if scores is not None:
                scores[:, step] = out
            if delay_s:
                time.sleep(delay_s)
            if streamer is not None:
                streamer.put(chosen[step])
        host_decode_ms = (time.perf_counter() - first_token_at) * 1000
        end = llama_cpp.llama_perf_context(model.context)
        ids = chosen.T.copy()
        if scores is None:
            self._record_perf(model, after_prefill, end, host_decode_ms, delay_s * (new_tokens - 1) * 1000,
                              n_rows, new_tokens, int(lengths.max()))
            model.last_tokens = ids
        return ids

    def _decode_setup(self, model: GGUFModel, seqs: Any) -> None:
        """Point the batch's first len(seqs) slots at those sequences, one token each."""
        import numpy as np

        k = len(seqs)
        for j in np.flatnonzero(model.seq_ids[:k] != seqs).tolist():
            model.batch.seq_id[j][0] = int(seqs[j])
            model.seq_ids[j] = seqs[j]
        model.batch.n_tokens = k

    def _record_perf(self, model: GGUFModel, after_prefill: Any, end: Any, host_decode_ms: float,
                     slept_ms: float, n_rows: int, new_tokens: int, prompt_tokens: int) -> None:
        # llama.cpp files a 1-token decode under t_eval and a multi-token one (a batch > 1) under t_p_eval, so
        # its decode time is the growth of both counters after the first token
        llama_decode_ms = (end.t_eval_ms + end.t_p_eval_ms) - (after_prefill.t_eval_ms + after_prefill.t_p_eval_ms)
        compared_ms = host_decode_ms - slept_ms  # the gate-testing delay is the host's on purpose
        difference = abs(compared_ms - llama_decode_ms) / max(llama_decode_ms, 1e-9) if new_tokens > 1 else 0.0
        model.last_perf = {
            "batch_size": n_rows, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "t_p_eval_ms": end.t_p_eval_ms, "n_p_eval": end.n_p_eval, "t_eval_ms": end.t_eval_ms,
            "n_eval": end.n_eval, "prefill_ms": after_prefill.t_p_eval_ms + after_prefill.t_eval_ms,
            "llama_decode_ms": llama_decode_ms, "host_decode_ms": host_decode_ms, "injected_delay_ms": slept_ms,
            "relative_difference": difference,
        }
        model.perf_unverified.append(model.last_perf)
        model.perf_history.append(model.last_perf)

    def logits(self, model: GGUFModel, ids: list[int]) -> Any:
        import numpy as np

        n = len(ids)
        self._ensure_context(model, n_seq=1, n_ctx_seq=n)
        self._clear(model)
        out = self._decode(model, np.asarray(ids, dtype=np.int32), np.arange(n, dtype=np.int32),
                           np.zeros(n, dtype=np.int32), np.ones(n, dtype=np.int8))
        return out.copy()  # llama.cpp's logits buffer is overwritten by the next decode

    # ---- checks and records -------------------------------------------------------------------------

    def verify(self, model: GGUFModel, generated: bool) -> None:
        if not generated:
            return
        calls, model.perf_unverified = model.perf_unverified, []
        check_engine_timer(calls, "llama_decode_ms", self.params["perf_tolerance"], "llama.cpp", "llama_perf_context")

    def describe(self, model: GGUFModel) -> dict[str, Any]:
        import llama_cpp

        if model.tokenizer_parity is None:
            reference = self.inputs["tokenizer_check"] if self.inputs is not None else hf_tokens(model.source)
            model.tokenizer_parity = tokenizer_parity(model, reference)
        context = model.context
        sha256 = model.sidecar.get("sha256") or file_sha256(model.path)
        differences = [call["relative_difference"] for call in model.perf_history]
        return {
            **super().describe(model),
            "qtype": self.params["qtype"] if not (self.params["file"] or self.params["model_file"]) else None,
            "model_file": self.params["model_file"],
            "model_desc": _model_desc(model.llama_model),
            "file": str(model.path),
            "file_size_bytes": model.path.stat().st_size,
            "sha256_prefix": sha256[:16],
            "vocab": model.vocab_kind,
            "tokenizer_parity": model.tokenizer_parity,
            "n_gpu_layers": model.n_gpu_layers,
            "flash_attn": self.params["flash_attn"],
            "n_batch": llama_cpp.llama_n_batch(context),
            "n_ubatch": llama_cpp.llama_n_ubatch(context),
            "n_threads": llama_cpp.llama_n_threads(context),
            "n_threads_batch": llama_cpp.llama_n_threads_batch(context),
            "token_choice": self.params["token_choice"],
            "n_seq_max": model.n_seq_max,
            "n_ctx_per_seq": model.n_ctx_seq,
            "llama_cpp_python": version("llama_cpp_python"),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),  # build flags
            "convert_s": model.sidecar.get("convert_s"),
            "quantize_s": model.sidecar.get("quantize_s"),
            "perf_check": {"calls": len(differences),
                           "mean_relative_difference": statistics.fmean(differences) if differences else None,
                           "tolerance": self.params["perf_tolerance"], "last": model.last_perf},
        }


def hf_tokens(folder: Path | None) -> dict[str, Any] | None:
    """The held-out check text and its ids under the folder's Hugging Face tokenizer (None: it has none).

    For a method used outside the suite's worker; there the prepare process makes these (harness/worker.py).
    """
    if folder is None or not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model",
                                                                   "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    from harness.models import tokenizer_check

    return tokenizer_check(AutoTokenizer.from_pretrained(str(folder)))


def tokenizer_parity(model: GGUFModel, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Compare the source's Hugging Face tokenizer with llama.cpp's on held-out text; say why when not compared.

    `reference` holds the text and the Hugging Face tokenizer's ids of it, made in the prepare process (this
    one does not load transformers, which loads torch); None when the model has no such tokenizer.
    """
    import llama_cpp

    if model.vocab_kind == "placeholder":
        return {"status": "not compared", "reason": "the GGUF vocabulary is a placeholder (no SentencePiece "
                "tokenizer in the source); the suite feeds token ids"}
    if reference is None:
        return {"status": "not compared", "reason": "no Hugging Face tokenizer beside the model"}
    text, expected = reference["text"], list(reference["ids"])
    encoded = text.encode("utf-8")
    buffer = (llama_cpp.llama_token * (len(encoded) + 16))()
    n = llama_cpp.llama_tokenize(model.vocab, encoded, len(encoded), buffer, len(buffer), True, False)
    if n < 0:
        return {"status": "error", "reason": f"llama_tokenize needed {-n} tokens, more than the buffer"}
    ours = list(buffer[:n])
    first = next((i for i, (a, b) in enumerate(zip(expected, ours, strict=False)) if a != b),
                 None if len(expected) == len(ours) else min(len(expected), len(ours)))
    return {"status": "match" if first is None else "mismatch", "characters": len(text),
            "hf_tokens": len(expected), "llama_cpp_tokens": len(ours), "first_difference": first}


def _meta(llama_model: Any, key: str) -> str | None:
    import llama_cpp

    buffer = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(llama_model, key.encode(), buffer, len(buffer))
    return buffer.value.decode() if n >= 0 else None


def _model_desc(llama_model: Any) -> str:
    import llama_cpp

    buffer = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llama_model, buffer, len(buffer))
    return buffer.value.decode()


def _free_context(model: GGUFModel) -> None:
    import llama_cpp

    if model.batch is not None:
        llama_cpp.llama_batch_free(model.batch)
        model.batch = None
    if model.context is not None:
        llama_cpp.llama_free(model.context)
        model.context = None
    _free_samplers(model)


def _free_samplers(model: GGUFModel) -> None:
    import llama_cpp

    for chain in model.samplers:
        llama_cpp.llama_sampler_free(chain)
    model.samplers = []


def _log(message: str) -> None:
    import sys

    print(f"[gguf] {message}", file=sys.stderr, flush=True)
