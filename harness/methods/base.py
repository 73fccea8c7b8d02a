"""What every quantization method provides: parameter checking, availability, loading and generation."""

from __future__ import annotations

import importlib.util
import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.config import MatrixError
from harness.measure.consistency import LOGIT_TOLERANCE
from harness.runtimes import TORCH, EngineRuntime

DTYPES = ("float32", "float16", "bfloat16")


def importable(module: str) -> bool:
    """Whether `module` (dotted names too: its missing parent is no error) can be imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class MethodUnavailable(RuntimeError):
    """This method cannot run here (library missing, no GPU, unsupported hardware): its cells skip."""


@dataclass(frozen=True)
class Param:
    """One matrix parameter of a method: its type, default, allowed values and a one-line help."""

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None


class Method(ABC):
    """A quantization method behind the registry; one instance loads one model in one worker process."""

    NAME: ClassVar[str]
    PARAMS: ClassVar[dict[str, Param]] = {}
    MARKER: ClassVar[str]  # pytest marker of its cells
    RUNTIME: ClassVar[EngineRuntime] = TORCH  # how the worker measures it (harness/runtimes.py)
    # The libraries whose versions, with the model's weights, decide this method's accuracy figures (perplexity,
    # divergence, top-1, task scores): a CPU cell's accuracy is compared with another CPU key's baseline only
    # where these versions match (harness/baselines.py: BaselineStore.gate_baseline).
    ACCURACY_PACKAGES: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    def __init__(self, params: dict[str, Any], device: str) -> None:
        self.params = {name: params.get(name, p.default) for name, p in self.PARAMS.items()}
        self.device = device
        self.inject_delay_ms = 0.0  # testing the gate only: sleep this long per generated token
        self.inputs: dict[str, Any] | None = None  # the ids the worker feeds (harness/worker.py: _inputs)
        self.prepared: dict[str, Any] | None = None  # what `prepare` returned, handed to the measuring process
        self.pickle_weights = False  # the model's matrix entry lets pickle weights load (ModelSpec.pickle_weights)

    @classmethod
    def validate(cls, params: dict[str, Any], where: str) -> None:
        """Raise ValueError naming `where` and the field for an unknown, mistyped or out-of-range parameter."""
        for name, value in params.items():
            if name not in cls.PARAMS:
                raise MatrixError(f"{where}.{name}: unknown parameter of backend {cls.NAME!r}; "
                                  f"known: {', '.join(sorted(cls.PARAMS))}")
            spec = cls.PARAMS[name]
            ok_type = isinstance(value, spec.type) and not (spec.type is not bool and isinstance(value, bool))
            if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
                ok_type = True
            if not ok_type:
                raise MatrixError(f"{where}.{name}: expected {spec.type.__name__}, got {value!r}")
            if spec.choices is not None and value not in spec.choices:
                raise MatrixError(f"{where}.{name}: expected one of {', '.join(map(str, spec.choices))}, "
                                  f"got {value!r}")

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        """Importable modules this method needs; a missing one skips its cells."""
        return ()

    def check_available(self) -> None:
        """Raise MethodUnavailable with the reason when this method cannot run on this machine."""
        for module in self.requires():
            if not importable(module):
                raise MethodUnavailable(f"{module} is not installed (install quantbench's "
                                        f"'{self.MARKER}' extra)")
        if self.device == "cuda":
            missing = self.RUNTIME.missing_gpu()
            if missing:
                raise MethodUnavailable(missing)

    def prepare(self, resolved: Any, seed: int, log: Any) -> dict[str, Any] | None:
        """Build what loading needs (a quantized checkpoint) in the prepare process; return its record.

        Runs once per (method, model) in its own process, outside every measured region; its wall time and
        peak memory become the quantization-cost figures. The default has nothing to build.
        """
        return None

    def compile_kernels(self, pretrained: str, log: Any) -> dict[str, Any] | None:
        """In the prepare process, after `prepare`: fill on-disk caches of kernels compiled at first use.

        Runs outside the quantization's figures and before the measured process, whose load time would
        otherwise include a compiler run on a fresh machine and not on the next. The default has none.
        """
        return None

    @abstractmethod
    def load(self, pretrained: str) -> Any:
        """Load (and quantize) the model from a folder or hub id onto the device; return it in eval mode."""

    def warm_up(self, model: Any) -> None:  # noqa: B027 - most methods have nothing to warm up
        """Work that happens once after loading (kernels compiled on first use); never timed."""

    def generate_kwargs(self) -> dict[str, Any]:
        """Extra `generate()` arguments this method runs with (e.g. a static cache)."""
        return {}

    def generate(self, model: Any, rows: list[list[int]], new_tokens: int, streamer: Any) -> None:
        """Greedily generate exactly `new_tokens` ids after each row, handing each step's ids to `streamer`.

        The default runs transformers' `generate()` (EOS ignored: min = max new tokens). Engines with
        their own decode loop override this and call `streamer.put(...)` once for the prompt and once per
        step, after the step's ids are on the host.
        """
        import torch

        input_ids = torch.tensor(rows, dtype=torch.long, device=model.device)
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
        kwargs = self.generate_kwargs()
        if self.inject_delay_ms:
            kwargs["logits_processor"] = _delay_processor(self.inject_delay_ms)
        with self.no_autograd():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=pad if pad is not None else 0, streamer=streamer, **kwargs)
        if output.shape[1] != input_ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate() returned {output.shape[1] - input_ids.shape[1]} new tokens, "
                               f"asked for {new_tokens}")

    def greedy(self, model: Any, rows: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Any]:
        """Greedy ids and per-step float32 scores [rows, steps, vocab] for prompts of different lengths.

        The default left-pads the batch and masks the padding, as users batch prompts with transformers.
        """
        import torch

        width = max(len(row) for row in rows)
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) or 0
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                            device=model.device)
        with self.no_autograd():
            output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                    output_scores=True, return_dict_in_generate=True, **self.generate_kwargs())
        scores = torch.stack(output.scores, dim=1).float().cpu()
        return output.sequences[:, width:].tolist(), scores

    def load_transformers(self, pretrained: str, quantization_config: Any = None) -> Any:
        """The model at `pretrained` through transformers, in the method's `dtype`, on its device, quantized on load
        by `quantization_config` where one is given; safetensors only unless the model ships pickled weights."""
        from transformers import AutoModelForCausalLM

        extra = {} if quantization_config is None else {"quantization_config": quantization_config}
        model = AutoModelForCausalLM.from_pretrained(
            pretrained, dtype=torch_dtype(self.params["dtype"]), device_map=self.device,
            use_safetensors=None if self.pickle_weights else True,  # a pickle can run code when loaded
            **extra)
        return model.eval()

    def no_autograd(self) -> Any:
        """The context generation and scoring run in: `torch.inference_mode()`, or `torch.no_grad()` for a
        library whose tensors cannot be used in inference mode."""
        import torch

        return torch.inference_mode()

    def weights_bytes(self, model: Any) -> int | None:
        """Bytes of the loaded weights (parameters and buffers, packed as stored): what one decode step reads."""
        seen, total = set(), 0
        for tensor in [*model.parameters(), *model.buffers()]:
            key = (tensor.data_ptr(), tensor.numel())
            if key not in seen:  # tied embeddings count once
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
        return total

    def corrupt_weights(self, model: Any, fraction: float, seed: int) -> int:
        """TESTING THE GATE ONLY: break the loaded weights as a faulty quantizer would; return the tensors changed.

        Every floating-point tensor the model holds (parameters and buffers: dense weights, GPTQ/AWQ scales,
        norms) and the scales bitsandbytes keeps beside its packed weights is multiplied, in memory, by
        1 + fraction x N(0, 1). Nothing on disk changes, so no cached checkpoint carries the fault.
        """
        import torch

        generator = torch.Generator().manual_seed(seed)
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
        for parameter in model.parameters():
            state = getattr(parameter, "quant_state", None)  # bitsandbytes 4-bit: per-block absmax
            for scales in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None),
                           getattr(parameter, "SCB", None)):  # SCB: bitsandbytes int8's per-row scales
                if isinstance(scales, torch.Tensor) and scales.is_floating_point():
                    tensors[id(scales)] = scales
        with torch.no_grad():
            for tensor in tensors.values():
                noise = torch.randn(tensor.shape, generator=generator).to(tensor.device, tensor.dtype)
                tensor.mul_(1 + fraction * noise)
        return len(tensors)

    def logits_dtype(self, model: Any) -> Any:
        """The dtype the model computes its logits in (its output head's), or None for float32."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        return weight.dtype if weight is not None and weight.is_floating_point() else None

    def logits(self, model: Any, ids: list[int]) -> Any:
        """Float32 logits [len(ids), vocab] of one sequence, position p predicting id p + 1."""
        import torch

        with self.no_autograd():
            window = torch.tensor([ids], dtype=torch.long, device=model.device)
            return model(window, use_cache=False).logits[0].float()

    def describe(self, model: Any) -> dict[str, Any]:
        """The resolved settings that decide this method's figures, recorded with every result."""
        return {"backend": self.NAME, "params": dict(self.params)}

    def device_timing_unavailable(self) -> str | None:
        """Why the suite's device timing (harness/measure/device.py: a transformers model's decode step over a
        static cache, captured as a CUDA graph) does not apply to this method, or None when it does."""
        return None

    def engine_timing(self, model: Any, batch_size: int, repeats: int) -> Any:
        """For an engine that runs its own decode loop: its own timer's DeviceTiming (harness/measure/device.py,
        how = engine_timer) over the last `repeats` timed generate() calls of `batch_size` rows, or None when it
        has none; the suite's device timer then applies (or device_timing_unavailable says why not)."""
        return None

    def capture_blocker(self) -> str | None:
        """Why this method's decode step cannot be captured as a CUDA graph (a host sync inside it), or None;
        such a step's device time is read from its kernels' own durations instead."""
        return None

    @property
    def compiled(self) -> bool:
        """Whether this method runs its decode step through torch.compile."""
        return self.params.get("mode") == "compiled"

    def consistency_tolerance(self) -> float:
        """The batched-vs-alone logit change, in standard deviations of the logits, that batch consistency
        accepts as arithmetic (harness/measure/consistency.py); an algorithm that is batch-variant by design
        says so here with a larger one."""
        return LOGIT_TOLERANCE

    def verify(self, model: Any, generated: bool) -> None:  # noqa: B027 - most methods have nothing to verify
        """Raise when the model is not what the parameters asked for (a silent fallback).

        Called after loading (`generated` False) and after each batch size's timed runs (True), since some
        choices (compilation, kernels) only show once the model has run.
        """


MODE = Param(str, "eager", "eager: HF generate as most users call it; compiled: static cache + torch.compile "
             "(CUDA graphs on GPU)", ("eager", "compiled"))


class CompilableMethod(Method):
    """A method run through transformers' `generate()` in one of two modes, the `mode` parameter.

    `eager` is plain `generate()`: at small batch it mostly measures Python and kernel-launch overhead.
    `compiled` adds a static KV cache, which makes `generate()` compile the decode step (torch.compile,
    CUDA graphs on GPU): what a user who cares about speed runs. Subclasses put `"mode": MODE` in PARAMS.
    """

    def check_available(self) -> None:
        super().check_available()
        if self.params["mode"] == "compiled" and self.device == "cpu":
            import shutil

            if shutil.which("cc") is None and shutil.which("gcc") is None:
                raise MethodUnavailable("torch.compile on CPU needs a C compiler, and none is on PATH")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.params["mode"] != "compiled":
            return {}
        from transformers import CompileConfig

        compile_config = CompileConfig()
        # generate() only auto-compiles on accelerators; the CPU suite asks for it explicitly.
        compile_config._compile_all_devices = self.device == "cpu"
        return {"cache_implementation": "static", "compile_config": compile_config}

    def verify(self, model: Any, generated: bool) -> None:
        if generated and self.params["mode"] == "compiled" and not hasattr(model, "_compiled_call"):
            raise RuntimeError("mode 'compiled' was asked for, but generate() ran the model uncompiled")

    def describe(self, model: Any) -> dict[str, Any]:
        return {**super().describe(model), "compiled": hasattr(model, "_compiled_call")}


def _delay_processor(delay_ms: float) -> Any:
    """A logits processor that sleeps per generated token: the test-only way to make a cell slower."""
    import time

    from transformers import LogitsProcessor, LogitsProcessorList

    class Delay(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            time.sleep(delay_ms / 1000)
            return scores

    return LogitsProcessorList([Delay()])


def torch_dtype(name: str) -> Any:
    """The torch dtype named `name` (one of DTYPES)."""
    import torch

    return getattr(torch, name)


def check_engine_timer(calls: list[dict[str, float]], engine_key: str, tolerance: float, engine: str,
                       counter: str) -> None:
    """Fail when an engine's own decode time (`calls[i][engine_key]`, read from `counter`) and the suite's, over the
    generate() calls since the last check, differ by more than `tolerance` (median relative difference): the
    suite's decode figure would not measure the engine."""
    if not calls:
        return
    difference = statistics.median(c["relative_difference"] for c in calls)
    if difference > tolerance:
        host = statistics.median(c["host_decode_ms"] - c["injected_delay_ms"] for c in calls)
        own = statistics.median(c[engine_key] for c in calls)
        raise RuntimeError(
            f"{engine}'s own decode time ({own:.2f} ms, {counter}) and the suite's ({host:.2f} ms) differ: median "
            f"relative difference {100 * difference:.1f}% over {len(calls)} generate() calls at batch size "
            f"{calls[-1]['batch_size']}, more than {100 * tolerance:.0f}% (perf_tolerance): the suite's decode "
            f"figure would not measure {engine}")
