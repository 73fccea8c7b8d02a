"""Device time of decode and prefill: what the kernels cost, without the host's loop around them.

`generate()` synchronizes host and device at every decode step (transformers 5.17 on CUDA), so its figures
hold the host's Python in series with the kernels and move 15-25 % between processes and cards. This module
times the same work the way llama-bench and gpt-fast do, on the device's own clock:

- The decode step (forward over one new id per row into a static KV cache, greedy argmax on the device, the
  next id and the cache position written in place) is captured once as a CUDA graph and replayed
  `steps` times back to back per burst; CUDA events bracket each burst, and the host never waits inside
  one. A compiled method's step runs torch.compile's kernels, an eager method's the eager kernels. The
  cache is rewound to the prompt's length before each burst, so every burst decodes the same positions
  over the same cache length (a static cache attends over its whole length at every step).
- The prefill (one forward over the prompt into the empty cache) is captured and replayed the same way, in
  bursts of `PREFILL_REPLAYS` replays per sample: one replay of a small model's prefill lasts a few
  milliseconds, short enough that the events' own jitter (0.5-0.7 % on an H200) hides a 2 % change.
- A step that cannot be captured (a host sync inside it, as LLM.int8's outlier search) is timed from its
  kernels' own durations (CUPTI through torch.profiler) over a few steps; the cell records why.
- One profiled step gives the exact companions: kernels launched per step and the set of their names, so a
  silent fallback to another kernel shows as a change.

Each figure records how it was made (`details.device_timing.how`, `protocol`). On a CPU the device is the
host: the CPU suite's speeds are its `generate()` figures, and this module's loop runs under a host clock
only in the suite's own tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from harness.figure import Figure

PROTOCOL = 1  # how the figures below are read; a baseline read under another is stale (harness/baselines.py)
PREFILL_PROTOCOL = 2  # how the prefill figure is read: 1 timed single replays, 2 bursts of PREFILL_REPLAYS
PREFILL_REPLAYS = 8  # prefill replays per timed sample (captured or host-clocked)
BURSTS = 10  # timed decode bursts (and prefill replays) per batch size; each figure is their median
WARMUP_BURSTS = 2  # untimed bursts first: clocks and caches settle
PROFILED_STEPS = 4  # decode steps per profiler session where the step cannot be captured
PROFILER_SESSIONS = 5  # profiler sessions (samples) for such a step


class How(str, Enum):
    """How a device figure was timed."""

    CUDA_GRAPH = "cuda_graph"  # CUDA events around replays of the captured step
    PROFILER = "profiler"  # the sum of the kernels' own durations (CUPTI), for a step that cannot be captured
    HOST_CLOCK = "host_clock"  # the host's clock around an uncaptured loop (the suite's tests on a CPU)
    ENGINE_TIMER = "engine_timer"  # an engine's own C++ timer around its decode calls (llama.cpp's llama_perf)


@dataclass(frozen=True)
class DeviceTiming:
    """Device seconds of one batch size's decode bursts and prefills, and how they were read."""

    how: How
    batch_size: int
    prompt_tokens: int
    steps: int  # decode steps per burst
    burst_s: tuple[float, ...]
    prefill_s: tuple[float, ...]
    kernels_per_step: int | None = None
    kernel_names: tuple[str, ...] = ()
    injected_s_per_step: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        """The median device time of one decode step."""
        return statistics.median(self.burst_s) / self.steps

    def figures(self, decode_s: tuple[float, ...] = (), decode_steps: int = 0) -> dict[str, Figure]:
        """The device figures; with `decode_s` (generate()'s decode times of `decode_steps` steps each) also
        the host's share of an end-to-end decode step."""
        out = {
            "decode_device_tokens_per_s": Figure.of([self.batch_size * self.steps / t for t in self.burst_s]),
            "prefill_device_tokens_per_s": Figure.of([self.batch_size * self.prompt_tokens / t
                                                      for t in self.prefill_s]),
        }
        if self.kernels_per_step is not None:
            out["decode_kernels_per_step"] = Figure(float(self.kernels_per_step))
        if decode_s and decode_steps:
            out["host_overhead_ms_per_token"] = Figure.of([(t / decode_steps - self.step_s) * 1000
                                                           for t in decode_s])
        return out

    def details(self) -> dict[str, Any]:
        """What the cell's details record of how the figures were made."""
        return {"protocol": PROTOCOL, "prefill_protocol": PREFILL_PROTOCOL, "how": self.how.value,
                "steps_per_burst": self.steps, "bursts": len(self.burst_s), "prefill_samples": len(self.prefill_s),
                "prefill_replays_per_sample": 1 if self.how in (How.PROFILER, How.ENGINE_TIMER) else PREFILL_REPLAYS,
                "step_ms": self.step_s * 1000, "kernels_per_step": self.kernels_per_step,
                "kernel_names": list(self.kernel_names), "injected_us_per_step": self.injected_s_per_step * 1e6,
                **self.notes}


class Timer:
    """Brackets regions on one clock; `seconds()` returns each region's duration once all have been queued."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._marks: list[tuple[Any, Any]] = []

    def start(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started: Any) -> None:
        self._marks.append((started, self.start()))

    def seconds(self) -> list[float]:
        if not self.cuda:
            return [end - start for start, end in self._marks]
        import torch

        torch.cuda.synchronize()  # the one wait: after every region has been queued
        return [start.elapsed_time(end) / 1000 for start, end in self._marks]


class CaptureFailed(RuntimeError):
    """The step could not be captured as a CUDA graph (a host sync or an uncapturable call inside it)."""


def capture(body: Callable[[], None], cuda: bool) -> Callable[[], None]:
    """`body` captured as a CUDA graph, returned as its replay; on a CPU, `body` itself.

    The body runs three times on a side stream first (lazy initialisation, compilation, allocator pools),
    as CUDA graph capture asks.
    """
    if not cuda:
        return body
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            body()
    except RuntimeError as exc:
        raise CaptureFailed(str(exc).splitlines()[0]) from exc
    return graph.replay


def spin_kernel(cuda: bool) -> Callable[[float], Callable[[], None]]:
    """A way to add a device-side delay to a step (testing the gate only): a factory from seconds to a
    callable that queues that long a spin.

    On CUDA the spin is `torch.cuda._sleep`, a kernel that busy-waits a number of clock cycles, calibrated
    here against CUDA events; on a CPU (the suite's tests) it sleeps on the host.
    """
    if not cuda:
        return lambda seconds: (lambda: time.sleep(seconds))
    import torch

    cycles = 5_000_000
    torch.cuda._sleep(cycles)  # first launch outside the measurement
    timer = Timer(cuda=True)
    for _ in range(3):
        started = timer.start()
        torch.cuda._sleep(cycles)
        timer.stop(started)
    per_second = cycles / statistics.median(timer.seconds())
    return lambda seconds: (lambda: torch.cuda._sleep(max(1, int(seconds * per_second))))


class StepProgram:
    """What the device timing needs from a loaded model: a static cache and one decode step and prefill.

    The default drives a transformers causal LM: a `StaticCache` of `prompt + steps + 1` positions, the
    prefill writing the prompt, the step reading one id per row. `compiled` wraps the model's forward in
    `torch.compile(fullgraph=True)` (inductor's kernels, captured by the graph below like any other).
    """

    def __init__(self, model: Any, rows: list[list[int]], steps: int, compiled: bool) -> None:
        import torch
        from transformers import StaticCache

        self.model = model
        self.prompt_tokens = len(rows[0])
        if any(len(row) != self.prompt_tokens for row in rows):
            raise ValueError("device timing needs prompts of one length (the suite's prompt_ids are)")
        device = model.device
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt_tokens + steps + 1)
        self.prompt = torch.tensor(rows, dtype=torch.long, device=device)
        self.first = torch.zeros((len(rows), 1), dtype=torch.long, device=device)  # the prefill's greedy ids
        self.ids = torch.zeros_like(self.first)  # the step's input, overwritten by its output
        self.generated = torch.zeros((len(rows), steps), dtype=torch.long, device=device)
        self.step_index = torch.zeros((), dtype=torch.long, device=device)

        def forward(ids: Any) -> Any:
            return model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits

        self.forward = torch.compile(forward, fullgraph=True, dynamic=False) if compiled else forward

    def rewind(self, length: int) -> None:
        """Set the cache's write position back to `length` (its contents beyond are overwritten later)."""
        layers = getattr(self.cache, "layers", ())
        if not layers or not all(hasattr(layer, "cumulative_length") for layer in layers):
            raise RuntimeError("this transformers StaticCache keeps no per-layer cumulative_length to rewind: "
                               "harness/measure/device.py needs updating for it")
        for layer in layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(length)

    def prefill(self) -> None:
        """Rewind to an empty cache and write the prompt; the greedy next ids go to `first`."""
        self.rewind(0)
        logits = self.model(input_ids=self.prompt, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1).logits
        self.first.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def start_decode(self) -> None:
        """Put the cache after the prompt and the prefill's ids into the step's input."""
        self.rewind(self.prompt_tokens)
        self.ids.copy_(self.first)
        self.step_index.zero_()

    def step(self) -> None:
        """One greedy decode step, its input and output in place (so a graph of it can be replayed)."""
        logits = self.forward(self.ids)
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.generated.index_copy_(1, self.step_index.view(1), self.ids)
        self.step_index.add_(1)


def profile_kernels(run: Callable[[], None], repeats: int, cuda: bool) -> tuple[float, int, tuple[str, ...]]:
    """Run `run` `repeats` times under torch.profiler: the kernels' summed device seconds per run, the
    kernels launched per run and the sorted set of their names."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            run()
        if cuda:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [e for e in prof.events() if e.device_type == kind and e.name not in _NOT_KERNELS]
    if not cuda:  # the tests' host profile: top-level aten ops stand for kernels
        kernels = [e for e in kernels if e.cpu_parent is None]
    device_us = sum(e.time_range.elapsed_us() for e in kernels)
    return device_us / 1e6 / repeats, round(len(kernels) / repeats), tuple(sorted({e.name for e in kernels}))


_NOT_KERNELS = frozenset({"Memcpy HtoD (Pageable -> Device)", "Memcpy DtoH (Device -> Pageable)",
                          "Memcpy DtoD (Device -> Device)", "Memset (Device)"})


def measure_device(
    model: Any,
    rows: list[list[int]],
    steps: int,
    compiled: bool,
    cuda: bool,
    capturable: str | None = None,
    inject_fraction: float = 0.0,
    bursts: int = BURSTS,
    warmup_bursts: int = WARMUP_BURSTS,
) -> tuple[DeviceTiming, list[list[int]]]:
    """Time decode and prefill of `rows` on the device as the module docstring says; also return the ids of
    the last burst (each row's `steps` greedy ids after the prefill's one), for checking them.

    `capturable` is None when the step may be captured, else why it cannot (then the profiler times it).
    `inject_fraction` (testing the gate only) adds a spin to every captured decode step that makes it that
    fraction slower, measured (`_slowed`); the prefill is left alone.
    """
    if steps < 3:
        raise ValueError(f"device timing needs at least 3 decode steps per burst (new_tokens >= 4), got {steps}")
    import torch

    # everything in inference mode: the static cache's tensors are made inside it (its first write), and an
    # inference tensor may only be written to there (the rewind between bursts)
    with torch.inference_mode():
        return _measure(model, rows, steps, compiled, cuda, capturable, inject_fraction, bursts, warmup_bursts)


def _measure(model: Any, rows: list[list[int]], steps: int, compiled: bool, cuda: bool, capturable: str | None,
             inject_fraction: float, bursts: int, warmup_bursts: int) -> tuple[DeviceTiming, list[list[int]]]:
    program = StepProgram(model, rows, steps, compiled)
    notes: dict[str, Any] = {"compiled": compiled}
    prefill = capture(program.prefill, cuda) if capturable is None else program.prefill
    prefill()
    program.start_decode()
    program.step()  # first call outside everything: a compiled step compiles here
    if compiled:
        notes["dynamo"] = _dynamo_counts()
    program.start_decode()
    _, kernels_per_step, names = profile_kernels(program.step, 1, cuda)
    replay: Callable[[], None] = program.step
    how = How.CUDA_GRAPH if cuda else How.HOST_CLOCK
    if capturable is None:
        try:
            program.start_decode()
            replay = capture(program.step, cuda)
        except CaptureFailed as exc:
            capturable = f"capture failed: {exc}"
    if capturable is not None:
        how = How.PROFILER
        notes["not_captured"] = capturable

    def bursts_of(step: Callable[[], None], count: int) -> list[float]:
        timer = Timer(cuda)
        for _ in range(count):
            program.start_decode()
            started = timer.start()
            for _ in range(steps):
                step()
            timer.stop(started)
        return timer.seconds()

    injected = 0.0
    if how is How.PROFILER:
        profiled = min(PROFILED_STEPS, steps)
        burst_s = []
        for _ in range(PROFILER_SESSIONS):
            program.start_decode()
            burst_s.append(profile_kernels(program.step, profiled, cuda)[0] * steps)
        program.start_decode()
        for _ in range(steps):  # one whole burst, untimed: the ids it decodes
            program.step()
    else:
        settled = statistics.median(bursts_of(replay, warmup_bursts))
        if inject_fraction:
            replay, injected, notes["injected_fraction_settled"] = _slowed(
                program, settled, steps, inject_fraction, how is How.CUDA_GRAPH, cuda,
                lambda step: statistics.median(bursts_of(step, warmup_bursts)))
        burst_s = bursts_of(replay, bursts)
    generated = program.generated.tolist()

    timer = Timer(cuda)
    prefills = PROFILER_SESSIONS if how is How.PROFILER else bursts
    if how is How.PROFILER:
        prefill_s = [profile_kernels(program.prefill, 1, cuda)[0] for _ in range(prefills)]
    else:
        for _ in range(prefills):
            started = timer.start()
            for _ in range(PREFILL_REPLAYS):
                prefill()
            timer.stop(started)
        prefill_s = [t / PREFILL_REPLAYS for t in timer.seconds()]
    timing = DeviceTiming(how, len(rows), program.prompt_tokens, steps, tuple(burst_s), tuple(prefill_s),
                          kernels_per_step, names, injected, notes)
    return timing, [[first, *ids] for first, ids in zip(program.first[:, 0].tolist(), generated, strict=True)]


def _slowed(program: StepProgram, settled_s: float, steps: int, fraction: float, graph: bool, cuda: bool,
            burst: Callable[[Callable[[], None]], float]) -> tuple[Callable[[], None], float, float]:
    """The step with a spin added that makes a burst `fraction` slower than `settled_s` (testing the gate):
    its replay, the spin's seconds per step and the slowdown it measured.

    A spin of `fraction` of the step's time does not always cost that much: where a step is bound by how fast
    the GPU's front end launches a graph's many small kernels (an eager TinyLlama step at b1: 1109 kernels in
    3 ms), the front end runs ahead during the spin and hides part of it (on an H200, 90 us added 35 us). So
    the spin is scaled until a measured burst is at least `fraction` slower, a few times at most.
    """
    spin = spin_kernel(cuda)
    seconds = fraction * settled_s / steps
    for _ in range(4):
        delay = spin(seconds)

        def slowed(delay: Callable[[], None] = delay) -> None:
            program.step()
            delay()

        program.start_decode()
        replay = capture(slowed, cuda) if graph else slowed
        measured = burst(replay) / settled_s - 1
        if measured >= fraction:
            break
        seconds *= min(fraction / max(measured, fraction / 20), 20.0) * 1.05
    return replay, seconds, measured


def _dynamo_counts() -> dict[str, int]:
    """torch.compile's counters so far in this process: graphs compiled and graph breaks (a recompile or a
    break in a step that compiled whole before shows here)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
