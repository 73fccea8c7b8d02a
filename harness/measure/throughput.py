"""Prefill and decode throughput of `generate()`, synchronized, after warm-up, over repeats.

Each repeat is one `generate()` of exactly N new tokens with a timing streamer: `generate()` hands the
streamer each new token as it reaches the host (a device sync it does anyway), so the first token's
arrival splits the call into time to first token (prefill) and decode (the other N - 1 tokens). Warm-up
runs are full length, so compiles, caches and clocks settle before any timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from harness.figure import Figure


def synchronize(device: str) -> None:
    """Wait for queued device work, so a host clock read brackets it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@contextmanager
def timed(device: str) -> Iterator[list[float]]:
    """Yield a list that receives the block's duration in seconds; device work is synchronized at both ends."""
    out: list[float] = []
    synchronize(device)
    start = time.perf_counter()
    yield out
    synchronize(device)
    out.append(time.perf_counter() - start)


class TimingStreamer:
    """A `generate()` streamer that timestamps every token batch it is handed (the prompt comes first)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


@dataclass(frozen=True)
class GenerationTiming:
    """Per-repeat times of one batch size, and the figures derived from them."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    first_token_s: tuple[float, ...]
    decode_s: tuple[float, ...]

    def figures(self) -> dict[str, Figure]:
        tokens = self.batch_size * (self.new_tokens - 1)
        return {
            "prefill_tokens_per_s": Figure.of([self.batch_size * self.prompt_tokens / t for t in self.first_token_s]),
            "ttft_ms": Figure.of([t * 1000 for t in self.first_token_s]),
            "decode_tokens_per_s": Figure.of([tokens / t for t in self.decode_s]),
        }


def measure_generation(
    generate: Callable[[int, Any], Any],
    device: str,
    batch_size: int,
    prompt_tokens: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
    around_repeats: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> GenerationTiming:
    """Time `generate(n, streamer)`, which must produce exactly n new tokens per row, as described above.

    `around_repeats()` is entered after the warm-up and left after the last timed repeat (GPU telemetry).
    """
    if new_tokens < 2:
        raise ValueError("decode throughput needs at least 2 new tokens")
    for _ in range(warmup):
        generate(new_tokens, None)
    first, decode = [], []
    synchronize(device)
    with around_repeats():
        for _ in range(repeats):
            streamer = TimingStreamer()
            synchronize(device)
            start = time.perf_counter()
            generate(new_tokens, streamer)
            synchronize(device)
            stop = time.perf_counter()
            # times[0]: the prompt, handed over before prefill; times[1]: the first new token on the host
            if len(streamer.times) < new_tokens + 1:
                raise RuntimeError(f"the streamer saw {len(streamer.times) - 1} new tokens, expected {new_tokens}")
            first.append(streamer.times[1] - start)
            decode.append(stop - streamer.times[1])
    return GenerationTiming(batch_size, prompt_tokens, new_tokens, tuple(first), tuple(decode))
