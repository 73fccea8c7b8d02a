"""Device-time figures: the captured step's loop, the figures made from it, the gate's use of them.

On a CPU the loop runs uncaptured under the host's clock (harness/measure/device.py); what is checked here is
that it decodes what generate() decodes, how figures are derived, how the injected slowdown is calibrated,
and how the gate and the calibration read device figures. The CUDA side ran on the H200 (docs/evidence).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import worker
from harness.baselines import BaselineStore, compare, kernel_changes, regressions, stale_figures
from harness.calibration import calibrate
from harness.config import RunConfig
from harness.figure import Figure
from harness.matrix import load_matrix
from harness.measure import device
from harness.measure.device import DeviceTiming, How, measure_device
from harness.results import CellResult
from harness.runtimes import NATIVE
from harness.tolerances import Tolerances

ROOT = Path(__file__).resolve().parent.parent
EVIDENCE = ROOT / "docs" / "evidence" / "nvidia-h200-140gb"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from harness.models import synthetic_folder

    os.environ.setdefault("QUANTBENCH_CACHE", str(tmp_path_factory.mktemp("qb-cache")))
    folder = synthetic_folder("tiny-test", 0, log=lambda _: None)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prompts(batch: int, length: int = 8) -> list[list[int]]:
    import torch

    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(0)).tolist()


def greedy(model, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch

    ids = torch.tensor(rows)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def test_the_timed_loop_decodes_exactly_what_generate_decodes(tiny_model):
    rows = prompts(3)
    timing, generated = measure_device(tiny_model, rows, 6, compiled=False, cuda=False, bursts=2, warmup_bursts=1)
    assert generated == greedy(tiny_model, rows, 7)  # the prefill's id and 6 steps, every burst rewound
    assert timing.how is How.HOST_CLOCK
    assert (timing.batch_size, timing.prompt_tokens, timing.steps) == (3, 8, 6)
    assert len(timing.burst_s) == 2 and len(timing.prefill_s) == 2
    assert timing.kernels_per_step and timing.kernel_names


def test_the_kernels_of_a_step_are_the_same_every_time(tiny_model):
    first, _ = measure_device(tiny_model, prompts(2), 3, compiled=False, cuda=False, bursts=1, warmup_bursts=1)
    again, _ = measure_device(tiny_model, prompts(2), 3, compiled=False, cuda=False, bursts=1, warmup_bursts=1)
    assert (first.kernels_per_step, first.kernel_names) == (again.kernels_per_step, again.kernel_names)


def test_an_uncapturable_step_says_why_and_still_decodes(tiny_model):
    rows = prompts(2)
    timing, generated = measure_device(tiny_model, rows, 4, compiled=False, cuda=False, capturable="a sync inside",
                                       bursts=1, warmup_bursts=1)
    assert timing.notes["not_captured"] == "a sync inside"
    assert len(timing.burst_s) == device.PROFILER_SESSIONS  # timed from the kernels' own durations
    assert generated == greedy(tiny_model, rows, 5)


def test_too_few_steps_are_refused(tiny_model):
    with pytest.raises(ValueError, match="at least 3 decode steps"):
        measure_device(tiny_model, prompts(1), 2, compiled=False, cuda=False)


def test_figures_are_tokens_over_device_seconds_and_the_host_share_is_the_difference():
    timing = DeviceTiming(How.CUDA_GRAPH, batch_size=4, prompt_tokens=128, steps=10, burst_s=(0.010, 0.020, 0.010),
                          prefill_s=(0.004, 0.008), kernels_per_step=300)
    figures = timing.figures(decode_s=(0.030, 0.050), decode_steps=10)
    assert figures["decode_device_tokens_per_s"].samples == (4000.0, 2000.0, 4000.0)
    assert figures["decode_device_tokens_per_s"].value == 4000.0
    assert figures["prefill_device_tokens_per_s"].samples == (128000.0, 64000.0)
    assert figures["decode_kernels_per_step"] == Figure(300.0)
    # generate()'s 3 and 5 ms a step against the device's median 1 ms
    assert figures["host_overhead_ms_per_token"].samples == pytest.approx((2.0, 4.0))
    assert "host_overhead_ms_per_token" not in timing.figures()
    assert timing.details()["how"] == "cuda_graph" and timing.details()["protocol"] == device.PROTOCOL


def test_the_injected_spin_grows_until_the_step_is_that_much_slower(monkeypatch):
    """On the H200 a spin of 3 % of a launch-bound step cost 1.2 %: the spin is scaled until it measures 3 %."""
    spins: list[float] = []
    monkeypatch.setattr(device, "spin_kernel", lambda cuda: (lambda s: spins.append(s) or (lambda: None)))

    class Program:
        def step(self) -> None: ...

        def start_decode(self) -> None: ...

    hidden = 0.6  # the share of a spin the front end hides
    settled, steps = 1.0, 10

    def burst(_replay) -> float:
        return settled + steps * spins[-1] * (1 - hidden)

    _, seconds, measured = device._slowed(Program(), settled, steps, 0.03, graph=False, cuda=False, burst=burst)
    assert spins[0] == pytest.approx(0.03 * settled / steps)
    assert len(spins) > 1 and measured >= 0.03 and seconds == spins[-1]


def cell(figures: dict[str, float], timing: dict | None = None) -> CellResult:
    return CellResult("fp16", "tinyllama-1.1b-arch", 1, figures={k: Figure(v) for k, v in figures.items()},
                      details={"device_timing": timing or {"protocol": 1, "how": "cuda_graph"}})


def test_device_figures_read_another_way_are_stale_and_only_they():
    captured = cell({"decode_device_tokens_per_s": 100.0, "decode_tokens_per_s": 50.0})
    profiled = cell({"decode_device_tokens_per_s": 90.0, "decode_tokens_per_s": 50.0},
                    {"protocol": 1, "how": "profiler"})
    stale = stale_figures(profiled, captured)
    assert list(stale) == ["decode_device_tokens_per_s"]
    assert "details.device_timing.how: baseline cuda_graph, now profiler" in stale["decode_device_tokens_per_s"]
    assert stale_figures(captured, captured) == {}


def test_a_prefill_timed_over_single_replays_is_stale_and_only_it():
    figures = {"decode_device_tokens_per_s": 100.0, "prefill_device_tokens_per_s": 9000.0}
    single = cell(figures, {"protocol": 1, "how": "cuda_graph"})  # recorded before bursts of prefill replays
    bursts = cell(figures, {"protocol": 1, "how": "cuda_graph", "prefill_protocol": device.PREFILL_PROTOCOL})
    stale = stale_figures(bursts, single)
    assert list(stale) == ["prefill_device_tokens_per_s"]
    assert f"prefill_protocol: baseline 1, now {device.PREFILL_PROTOCOL}" in stale["prefill_device_tokens_per_s"]
    assert stale_figures(bursts, bursts) == {}
    unavailable = cell(figures, {"unavailable": "llama.cpp"})
    assert stale_figures(unavailable, unavailable) == {}


def test_each_prefill_sample_is_a_burst_of_replays(tiny_model, monkeypatch):
    calls = []
    original = device.StepProgram.prefill
    monkeypatch.setattr(device.StepProgram, "prefill", lambda self: calls.append(1) or original(self))
    timing, _ = measure_device(tiny_model, prompts(1), 3, compiled=False, cuda=False, bursts=2, warmup_bursts=1)
    assert len(timing.prefill_s) == 2
    assert len(calls) == 1 + 2 * device.PREFILL_REPLAYS  # the first prefill, then two timed bursts
    assert timing.details()["prefill_replays_per_sample"] == device.PREFILL_REPLAYS


def test_a_change_in_the_kernels_a_step_launches_is_named():
    old = cell({}, {"protocol": 1, "how": "cuda_graph", "kernel_names": ["gemv", "rmsnorm"]})
    new = cell({}, {"protocol": 1, "how": "cuda_graph", "kernel_names": ["gemm_fallback", "rmsnorm"]})
    assert kernel_changes(new, old) == ("the decode step's kernels of fp16|tinyllama-1.1b-arch|b1 changed "
                                        "(new: gemm_fallback; gone: gemv)")
    assert kernel_changes(old, old) is None
    assert kernel_changes(new, cell({})) is None  # a baseline without the set compares nothing


def test_the_device_tolerance_catches_three_percent_and_lets_card_to_card_noise_pass():
    baseline = CellResult("fp16", "m", 1, figures={"decode_device_tokens_per_s": Figure.of([336.6, 336.7, 336.6])})
    tolerances = Tolerances()

    def measured(*samples: float) -> CellResult:
        return CellResult("fp16", "m", 1, figures={"decode_device_tokens_per_s": Figure.of(list(samples))})

    assert regressions(compare(measured(326.5, 326.4, 326.6), baseline, tolerances))  # 3 % slower
    assert not regressions(compare(measured(335.9, 336.0, 335.8), baseline, tolerances))  # 0.2 %


def test_the_worker_records_device_figures_on_a_gpu_and_says_why_not_elsewhere(monkeypatch):
    class Method:
        compiled = False
        RUNTIME = NATIVE  # no CUDA here: nothing of torch's to release, no out-of-memory error to map

        def device_timing_unavailable(self):
            return None

        def capture_blocker(self):
            return None

        def engine_timing(self, model, batch_size, repeats):
            return None

    timing = DeviceTiming(How.CUDA_GRAPH, 1, 8, 3, (0.003, 0.003), (0.001,), 40, ("k",))
    monkeypatch.setattr(device, "measure_device", lambda *a, **k: (timing, [[1, 2, 3, 4]]))
    run = RunConfig(new_tokens=4)
    on_gpu = CellResult("m", "x", 1)
    worker._device_timing(Method(), None, on_gpu, [[0] * 8], run, "cuda", (0.012,), 0.0)
    assert on_gpu.figures["decode_device_tokens_per_s"].value == 1000.0
    assert on_gpu.figures["host_overhead_ms_per_token"].value == pytest.approx(3.0)
    assert on_gpu.details["device_timing"]["how"] == "cuda_graph"
    on_cpu = CellResult("m", "x", 1)
    worker._device_timing(Method(), None, on_cpu, [[0] * 8], run, "cpu", (0.012,), 0.0)
    assert "device is the host" in on_cpu.details["device_timing"]["unavailable"] and not on_cpu.figures

    class Engine(Method):  # an engine with its own timer (llama.cpp): its figures, never the suite's timer
        def engine_timing(self, model, batch_size, repeats):
            return DeviceTiming(How.ENGINE_TIMER, batch_size, 8, 3, (0.006,) * repeats, (0.002,) * repeats)

    monkeypatch.setattr(device, "measure_device", lambda *a, **k: pytest.fail("the engine's own timer applies"))
    engine = CellResult("m", "x", 1)
    worker._device_timing(Engine(), None, engine, [[0] * 8], RunConfig(new_tokens=4, repeats=2), "cuda", (0.012,), 0.0)
    assert engine.figures["decode_device_tokens_per_s"].value == 500.0
    assert engine.figures["prefill_device_tokens_per_s"].value == 4000.0
    assert engine.figures["host_overhead_ms_per_token"].value == pytest.approx(2.0)
    assert engine.details["device_timing"]["how"] == "engine_timer"
    assert engine.details["device_timing"]["prefill_replays_per_sample"] == 1
    on_cpu = CellResult("m", "x", 1)
    worker._device_timing(Engine(), None, on_cpu, [[0] * 8], run, "cpu", (0.012,), 0.0)
    assert "device is the host" in on_cpu.details["device_timing"]["unavailable"] and not on_cpu.figures

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(device, "measure_device", broken)
    failed = CellResult("m", "x", 1)
    worker._device_timing(Method(), None, failed, [[0] * 8], run, "cuda", (0.012,), 0.0)
    assert failed.details["device_timing"] == {"error": "RuntimeError: operation not permitted when stream is "
                                                        "capturing"}


def _files(*names: str) -> list[Path]:
    return [EVIDENCE / f"device-{name}-results.jsonl" for name in names]


@pytest.mark.parametrize("document_name, baselines, record, aa, injected", [
    # against the committed baselines: runs O, Q, T and Y recorded, runs P, R and S gated on other cards, T
    # with a 3 % slowdown injected
    ("gate-calibration.json", ROOT / "baselines",
     ("tiny-rerecord", "tiny-int8-record", "tiny-4bit-record", "7b-record", "tiny-bf16-record", "7b-compiled-record",
      "7b-nf4-record", "y-aa-torchao"),
     [("aa5",), ("aa4",), ("aa3",)], ("injected4",)),
    # against run L's baselines (kept beside the runs that gated them), which run Q replaced: runs M and N
    ("gate-calibration-run-L.json", EVIDENCE / "baselines-run-L", ("record", "record-compiled"),
     [("aa1", "aa1-compiled"), ("aa2",)], ("injected2",)),
])
def test_the_committed_h200_calibrations_replay_from_their_runs(document_name, baselines, record, aa, injected):
    """Each calibration document is what `quantbench calibrate` makes of the committed runs (README there)."""
    import json

    document = calibrate(BaselineStore(baselines), load_matrix(ROOT / "benchmarks" / "matrix.toml"),
                         _files(*record), [_files(*names) for names in aa], _files(*injected))
    committed = json.loads((EVIDENCE / document_name).read_text())
    assert [c for c in document["cells"]] == committed["cells"]
    for entry in document["cells"]:
        assert entry["aa_failures"] == 0
        injected_decode = entry["injected_checks"] and entry["metric"] == "decode_device_tokens_per_s"
        assert entry["injected_failures"] == int(bool(injected_decode))
        if entry["metric"] == "decode_device_tokens_per_s":
            assert entry["between_process_cv"] < 0.01
