"""The regression rule, the verdicts it gives, and the tolerances it is held to."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from harness.baselines import (
    RelativeNoiseAwareRule,
    Verdict,
    compare,
    regressions,
    resolution_summary,
    run_differences,
    unresolved,
)
from harness.figure import Figure
from harness.metrics import METRICS
from harness.results import CellResult
from harness.tolerances import Tolerances

CELL = "bnb-nf4|llama-2-7b-arch|b8"
HIGHER_IS_BETTER = sorted(name for name, spec in METRICS.items() if spec.higher_is_better)
LOWER_IS_BETTER = sorted(name for name, spec in METRICS.items() if not spec.higher_is_better)
RELATIVE = sorted(name for name, spec in METRICS.items() if not spec.exact)  # held to a relative tolerance
EXACT = sorted(name for name, spec in METRICS.items() if spec.exact)

values = st.floats(min_value=1e-3, max_value=1e6)
spreads = st.floats(min_value=0.0, max_value=1e3)
# Tolerances are 0 or not tiny, so float rounding of a worsening stays far below the tolerance.
tolerances = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=0.9))
sigmas = st.floats(min_value=0.0, max_value=5.0)


def test_both_directions_are_covered() -> None:
    assert HIGHER_IS_BETTER and LOWER_IS_BETTER


def worsened(metric: str, baseline: float, fraction: float) -> float:
    """`baseline` made worse by `fraction` of itself, in the metric's direction."""
    return baseline * (1 - fraction) if METRICS[metric].higher_is_better else baseline * (1 + fraction)


def improved(metric: str, baseline: float, fraction: float) -> float:
    """`baseline` made better by `fraction` of itself (below 1), in the metric's direction."""
    return baseline * (1 + fraction) if METRICS[metric].higher_is_better else baseline * (1 - fraction)


def check(metric: str, baseline: Figure, measured: Figure, tolerance: float,
          noise_sigmas: float = 2.0) -> Verdict:
    return RelativeNoiseAwareRule(noise_sigmas).check(CELL, metric, baseline, measured, tolerance)


@pytest.mark.parametrize("metric", RELATIVE)
@given(value=values, fraction=st.floats(min_value=0.0, max_value=0.99), spread_b=spreads, spread_m=spreads,
       tolerance=tolerances, noise_sigmas=sigmas)
def test_improvements_never_regress(metric: str, value: float, fraction: float, spread_b: float,
                                    spread_m: float, tolerance: float, noise_sigmas: float) -> None:
    measured = improved(metric, value, fraction)
    verdict = check(metric, Figure(value, spread_b), Figure(measured, spread_m), tolerance, noise_sigmas)
    assert not verdict.regressed
    assert verdict.change <= 0


@pytest.mark.parametrize("metric", RELATIVE)
@given(value=values, share=st.floats(min_value=0.0, max_value=0.999), spread_b=spreads, spread_m=spreads,
       tolerance=tolerances, noise_sigmas=sigmas)
def test_a_worsening_within_tolerance_never_regresses(metric: str, value: float, share: float,
                                                      spread_b: float, spread_m: float, tolerance: float,
                                                      noise_sigmas: float) -> None:
    # `share` stays below 1 so rounding cannot push the change over the tolerance.
    measured = worsened(metric, value, tolerance * share)
    verdict = check(metric, Figure(value, spread_b), Figure(measured, spread_m), tolerance, noise_sigmas)
    assert not verdict.regressed


@pytest.mark.parametrize("metric", RELATIVE)
@given(value=values, tolerance=tolerances, margin=st.floats(min_value=1e-6, max_value=0.09),
       noise_sigmas=sigmas)
def test_a_worsening_beyond_tolerance_without_noise_regresses(metric: str, value: float, tolerance: float,
                                                              margin: float, noise_sigmas: float) -> None:
    measured = worsened(metric, value, tolerance + margin)
    assume(abs(measured - value) > METRICS[metric].floor)
    verdict = check(metric, Figure(value), Figure(measured), tolerance, noise_sigmas)
    assert verdict.regressed
    assert verdict.change > tolerance
    assert verdict.noise == pytest.approx(METRICS[metric].floor / value)


@pytest.mark.parametrize("metric", [name for name, spec in sorted(METRICS.items()) if spec.floor])
@given(value=values, share=st.floats(min_value=0.0, max_value=0.999))
def test_a_change_below_the_metric_floor_never_regresses(metric: str, value: float, share: float) -> None:
    floor = METRICS[metric].floor
    measured = value + (-share if METRICS[metric].higher_is_better else share) * floor
    verdict = check(metric, Figure(value), Figure(measured), 0.0, 2.0)
    assert not verdict.regressed


@pytest.mark.parametrize("metric", RELATIVE)
@given(value=values, fraction=st.floats(min_value=0.0, max_value=0.99), tolerance=tolerances,
       spread_m=spreads, noise_sigmas=st.floats(min_value=1.0, max_value=5.0))
def test_noise_as_large_as_the_change_suppresses_a_regression(metric: str, value: float, fraction: float,
                                                              tolerance: float, spread_m: float,
                                                              noise_sigmas: float) -> None:
    measured = worsened(metric, value, fraction)
    baseline = Figure(value, spread=abs(measured - value))
    verdict = check(metric, baseline, Figure(measured, spread_m), tolerance, noise_sigmas)
    assert not verdict.regressed


@pytest.mark.parametrize("metric", sorted(METRICS))
@given(baseline=values, measured=values)
def test_the_sign_of_change_follows_the_direction(metric: str, baseline: float, measured: float) -> None:
    verdict = check(metric, Figure(baseline), Figure(measured), 0.05)
    went_up = (measured > baseline) - (measured < baseline)
    expected_sign = -went_up if METRICS[metric].higher_is_better else went_up
    assert (verdict.change > 0) - (verdict.change < 0) == expected_sign
    assert math.isclose(abs(verdict.change), abs(measured - baseline) / baseline)


@given(metric=st.sampled_from(RELATIVE), baseline=values, measured=values, tolerance=tolerances)
def test_the_message_names_cell_metric_figures_change_and_tolerance(
    metric: str, baseline: float, measured: float, tolerance: float
) -> None:
    verdict = check(metric, Figure(baseline), Figure(measured), tolerance)
    message = verdict.message
    assert CELL in message
    assert message.startswith(f"{metric} of {CELL} ")
    assert f"baseline {baseline:.4g}" in message or f"baseline {baseline:.0f}" in message
    assert f"measured {measured:.4g}" in message or f"measured {measured:.0f}" in message
    assert f"tolerance {tolerance:.1%}" in message
    if verdict.change:
        assert f"{abs(verdict.change):.1%}" in message


def test_the_message_reads_as_a_sentence() -> None:
    verdict = RelativeNoiseAwareRule(2.0).check(
        CELL, "decode_tokens_per_s", Figure(120.4, spread=0.4816), Figure(105.6), 0.05
    )
    assert verdict.regressed
    assert verdict.message == (
        "decode_tokens_per_s of bnb-nf4|llama-2-7b-arch|b8 regressed 12.3% "
        "(baseline 120.4 tokens/s, measured 105.6 tokens/s; tolerance 5.0%, noise 0.8%)"
    )


def test_the_message_says_why_a_worsening_passed() -> None:
    within_tolerance = check("ppl", Figure(10.0), Figure(10.05), 0.01)
    within_noise = check("ppl", Figure(10.0, spread=1.0), Figure(11.0), 0.01)
    better = check("ppl", Figure(10.0), Figure(9.0), 0.01)
    assert "worsened 0.5%, within tolerance" in within_tolerance.message
    assert "worsened 10.0%, within noise" in within_noise.message
    assert "improved 10.0%" in better.message
    assert "(baseline 10, measured 10.05; " in within_tolerance.message


@pytest.mark.parametrize("metric", RELATIVE)
@given(value=values, tolerance=st.floats(min_value=1e-3, max_value=0.9), share=st.floats(min_value=0.0, max_value=0.99),
       factor=st.floats(min_value=1.01, max_value=100.0), noise_sigmas=st.floats(min_value=0.5, max_value=5.0))
def test_a_check_is_resolved_exactly_when_the_spreads_fit_inside_the_tolerance(
    metric: str, value: float, tolerance: float, share: float, factor: float, noise_sigmas: float
) -> None:
    # spreads whose combined noise is `share` (resolved) or `factor` (unresolved) times the tolerance
    def spread(times: float) -> float:
        return times * tolerance * value / (noise_sigmas * math.sqrt(2))

    quiet = check(metric, Figure(value, spread(share)), Figure(value, spread(share)), tolerance, noise_sigmas)
    noisy = check(metric, Figure(value, spread(factor)), Figure(value, spread(factor)), tolerance, noise_sigmas)
    assert quiet.resolved and not noisy.resolved
    assert unresolved([quiet, noisy]) == [noisy]


def test_there_are_exact_figures() -> None:
    assert EXACT == ["decode_kernels_per_step"]


@pytest.mark.parametrize("metric", EXACT)
@given(value=st.integers(min_value=1, max_value=10_000), other=st.integers(min_value=1, max_value=10_000),
       tolerance=tolerances, spread=spreads, noise_sigmas=sigmas)
def test_an_exact_figure_fails_on_any_change_either_way_whatever_the_tolerance_and_noise(
    metric: str, value: int, other: int, tolerance: float, spread: float, noise_sigmas: float
) -> None:
    verdict = check(metric, Figure(float(value), spread), Figure(float(other), spread), tolerance, noise_sigmas)
    assert verdict.regressed == (value != other)
    assert verdict.resolved
    if value != other:
        assert "changed (an exact figure: any change fails)" in verdict.message
        assert f"baseline {value}" in verdict.message and f"measured {other}" in verdict.message


def test_a_regression_caught_through_the_noise_is_not_also_unresolved() -> None:
    caught = check("decode_tokens_per_s", Figure(100.0, spread=5.0), Figure(50.0, spread=5.0), 0.05)
    assert caught.regressed and not caught.resolved
    assert unresolved([caught]) == []


def test_a_metric_floor_alone_never_makes_a_check_unresolved() -> None:
    # a load time of 0.2 s sits below the floor of load_s, yet with no spreads the check is resolved
    assert METRICS["load_s"].floor > 0.2 * 0.2
    assert check("load_s", Figure(0.2), Figure(0.21), 0.2).resolved


def test_the_resolution_summary_counts_per_metric_and_is_silent_when_all_resolved() -> None:
    assert resolution_summary([("decode_tokens_per_s", False)] * 3) is None
    line = resolution_summary([("decode_tokens_per_s", True), ("ttft_ms", False), ("decode_tokens_per_s", True),
                               ("ppl", True), ("ttft_ms", False), ("decode_tokens_per_s", False), ("ttft_ms", False)])
    assert line is not None
    assert line.startswith("3 of 7 check(s) passed with spreads wider than their tolerance "
                           "(decode_tokens_per_s 2/3, ppl 1/1)")


def test_a_zero_baseline_does_not_divide_by_zero() -> None:
    unchanged = check("peak_vram_mib", Figure(0.0), Figure(0.0), 0.05)
    grew = check("peak_vram_mib", Figure(0.0), Figure(12.0), 0.05)
    grew_within_noise = check("peak_vram_mib", Figure(0.0, spread=10.0), Figure(12.0), 0.05)
    shrank_to_zero = check("decode_tokens_per_s", Figure(0.0), Figure(5.0), 0.05)
    assert (unchanged.change, unchanged.regressed) == (0.0, False)
    assert grew.change == math.inf and grew.regressed
    assert not grew_within_noise.regressed
    assert shrank_to_zero.change == -math.inf and not shrank_to_zero.regressed
    assert grew.message == (f"peak_vram_mib of {CELL} regressed by 12 MiB (baseline 0 MiB, measured 12 MiB; "
                            "tolerance 5.0%, noise 0 MiB)")
    assert grew_within_noise.noise_abs == 20.0 and "noise 20 MiB" in grew_within_noise.message
    kld = check("kld_mean", Figure(0.0), Figure(0.0), 0.1)  # a reference against itself: floor, no spread
    assert kld.message.endswith("did not change (baseline 0 nats, measured 0 nats; tolerance 10.0%, noise 0.0001 nats)")


def cell(method: str = "bnb-int8", **figures: Figure) -> CellResult:
    return CellResult(method, "tinyllama-1.1b-arch", 4, figures=dict(figures))


def test_compare_covers_the_figures_both_sides_have() -> None:
    measured = cell(decode_tokens_per_s=Figure(80.0), ppl=Figure(7.0), ttft_ms=Figure(10.0))
    baseline = cell(decode_tokens_per_s=Figure(100.0), ppl=Figure(7.0), peak_vram_mib=Figure(900.0))
    verdicts = compare(measured, baseline, Tolerances())
    assert [v.metric for v in verdicts] == ["decode_tokens_per_s", "ppl"]
    assert [v.metric for v in regressions(verdicts)] == ["decode_tokens_per_s"]
    assert all(v.cell_id == "bnb-int8|tinyllama-1.1b-arch|b4" for v in verdicts)


def test_compare_without_a_baseline_has_no_verdicts() -> None:
    assert compare(cell(ppl=Figure(7.0)), None, Tolerances()) == []


def test_compare_refuses_a_baseline_of_another_cell() -> None:
    with pytest.raises(ValueError, match="fp16"):
        compare(cell(), cell("fp16"), Tolerances())


def test_compare_uses_the_method_tolerance_and_the_configured_noise() -> None:
    measured = cell(decode_tokens_per_s=Figure(85.0, spread=3.0))
    baseline = cell(decode_tokens_per_s=Figure(100.0, spread=4.0))
    strict = Tolerances(noise_sigmas=2.0)
    loose = strict.with_cli(["bnb-int8:decode_tokens_per_s=0.2"])
    noisy = Tolerances(noise_sigmas=4.0)
    assert regressions(compare(measured, baseline, strict))
    assert not regressions(compare(measured, baseline, loose))
    assert compare(measured, baseline, loose)[0].tolerance == 0.2
    assert not regressions(compare(measured, baseline, noisy))
    assert regressions(compare(measured, baseline, noisy, rule=RelativeNoiseAwareRule(0.0)))


def test_tolerances_default_to_the_metric_registry() -> None:
    tolerances = Tolerances()
    for name, spec in METRICS.items():
        assert tolerances.for_cell("fp16", name) == spec.tolerance
    assert tolerances.noise_sigmas == 2.0


def test_a_method_override_beats_a_metric_override_beats_the_default() -> None:
    tolerances = Tolerances.from_mapping(
        {"decode_tokens_per_s": 0.1, "methods": {"bnb-int8": {"decode_tokens_per_s": 0.2}},
         "noise_sigmas": 3},
        "matrix.toml [tolerances]",
    )
    assert tolerances.for_cell("bnb-int8", "decode_tokens_per_s") == 0.2
    assert tolerances.for_cell("fp16", "decode_tokens_per_s") == 0.1
    assert tolerances.for_cell("bnb-int8", "ppl") == METRICS["ppl"].tolerance
    assert tolerances.noise_sigmas == 3.0


def test_cli_specs_apply_in_order_on_a_copy() -> None:
    base = Tolerances.from_mapping({"ppl": 0.02}, "matrix.toml [tolerances]")
    tolerances = base.with_cli(["ppl=0.03", "gguf:q4_k_m:ppl=0.1", "ttft_ms = 0.5", "ppl=0.04"])
    assert tolerances.for_cell("fp16", "ppl") == 0.04
    assert tolerances.for_cell("gguf:q4_k_m", "ppl") == 0.1
    assert tolerances.for_cell("fp16", "ttft_ms") == 0.5
    assert base.for_cell("fp16", "ppl") == 0.02
    assert base.method_overrides == {}


def test_for_cell_names_an_unknown_metric() -> None:
    with pytest.raises(KeyError, match="unknown metric 'tps'.*decode_tokens_per_s"):
        Tolerances().for_cell("fp16", "tps")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"tokens_per_s": 0.1}, r"tokens_per_s: unknown metric 'tokens_per_s'; known metrics: .*ppl"),
        ({"methods": {"awq": {"pplx": 0.1}}}, r"methods.awq.pplx: unknown metric 'pplx'"),
        ({"ppl": -0.01}, r"ppl: expected a relative tolerance .* got -0.01"),
        ({"ppl": "0.01"}, r"ppl: expected a relative tolerance .* got '0.01'"),
        ({"ppl": True}, r"ppl: expected a relative tolerance .* got True"),
        ({"ppl": 10}, r"ppl: expected a relative tolerance .* got 10"),
        ({"ppl": float("nan")}, r"ppl: expected a relative tolerance .* got nan"),
        ({"methods": {"awq": {"ppl": 50}}}, r"methods.awq.ppl: expected a relative tolerance .* got 50"),
        ({"methods": ["awq"]}, r"methods: expected a table"),
        ({"methods": {"awq": 0.1}}, r"methods.awq: expected a table"),
        ({"noise_sigmas": -1}, r"noise_sigmas: expected a number of at least 0"),
        ({"noise_sigmas": "two"}, r"noise_sigmas: expected a number"),
    ],
)
def test_bad_tolerance_tables_name_source_and_field(data: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected) as caught:
        Tolerances.from_mapping(data, "matrix.toml [tolerances]")
    assert str(caught.value).startswith("matrix.toml [tolerances]: ")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tps=0.1", r"--tolerance 'tps=0.1': tps: unknown metric 'tps'; known metrics: .*ppl"),
        ("awq:tps=0.1", r"awq:tps: unknown metric 'tps'"),
        ("ppl=-0.1", r"--tolerance 'ppl=-0.1': ppl: expected a relative tolerance .* got -0.1"),
        ("ppl=abc", r"ppl: expected a relative tolerance .* got 'abc'"),
        ("ppl=", r"ppl: expected a relative tolerance .* got ''"),
        ("ppl=12", r"ppl: expected a relative tolerance .* got 12.0"),
        ("ppl", r"--tolerance 'ppl': expected metric=TOLERANCE or method:metric=TOLERANCE"),
        ("=0.1", r"expected metric=TOLERANCE"),
        (":ppl=0.1", r"expected metric=TOLERANCE"),
        ("awq:=0.1", r"expected metric=TOLERANCE"),
    ],
)
def test_bad_cli_specs_are_named(spec: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        Tolerances().with_cli([spec])


def test_provenance_mismatch_names_changed_settings_and_inputs() -> None:
    from harness.baselines import provenance_mismatch

    def made(run: dict, digest: str) -> CellResult:
        return CellResult(method="m", model="x", batch_size=1, config={"run": run, "method": {"dtype": "float16"}},
                          details={"prompt_ids_digest": digest})

    base = made({"new_tokens": 64, "cell_timeout_s": 10}, "aaa")
    assert provenance_mismatch(made({"new_tokens": 64, "cell_timeout_s": 99}, "aaa"), base) == []
    assert provenance_mismatch(made({"new_tokens": 32, "cell_timeout_s": 10}, "bbb"), base) == [
        "config.run.new_tokens: baseline 64, now 32",
        "details.prompt_ids_digest: baseline aaa, now bbb (different token ids)",
    ]



def test_only_the_figures_a_changed_memory_protocol_reads_are_stale() -> None:
    """A baseline from before the tracker emptied torch's cache (no protocol recorded: 1) has a stale NVML
    figure for a torch cell on a GPU (2); its other figures, and cells whose memory was read as before,
    stay comparable."""
    from harness.baselines import stale_figures

    def made(**details: int) -> CellResult:
        figures = {"peak_nvml_mib": Figure(100.0), "peak_vram_mib": Figure(90.0), "decode_tokens_per_s": Figure(9.0)}
        return CellResult(method="m", model="x", batch_size=1, figures=figures, details=details)

    stale = stale_figures(made(memory_protocol=2), made())
    assert list(stale) == ["peak_nvml_mib"] and "details.memory_protocol: baseline 1, now 2" in stale["peak_nvml_mib"]
    assert stale_figures(made(memory_protocol=1), made()) == {}
    assert stale_figures(made(memory_protocol=2), made(memory_protocol=2)) == {}


def test_run_differences_name_versions_driver_and_host_that_both_runs_recorded() -> None:
    def run(torch: str, driver: str, cpus: int, extra: dict | None = None,
            uuid: str = "GPU-c37ffd22-ad69-d0c4-c4f7-dbe0905c201e") -> CellResult:
        return CellResult("fp16", "m", 1, environment={"packages": {"torch": torch, "gguf": None, **(extra or {})},
                                                       "quantbench_revision": "abc", "torch_cuda": "13.0"},
                          hardware={"cpu": "Xeon", "cpu_count": cpus,
                                    "gpu": {"driver": driver, "name": "H200", "uuid": uuid}})

    baseline = run("2.11.0", "580.1", 64)
    assert run_differences(run("2.11.0", "580.1", 64), baseline) == []
    # a package only the newer run tracks says nothing about what changed
    assert run_differences(run("2.11.0", "580.1", 64, {"lm-eval": "0.4"}), baseline) == []
    assert run_differences(run("2.12.0", "590.2", 16), baseline) == [
        "torch 2.11.0 -> 2.12.0", "gpu.driver 580.1 -> 590.2", "cpu_count 64 -> 16"]
    # the same model of card, but another card: the first place to look when a host-bound figure moved
    assert run_differences(run("2.11.0", "580.1", 64, uuid="GPU-be79431d-799f-0a79-d1fe-60a2543bc9b7"), baseline) == [
        "another GPU (uuid GPU-c37ffd22... -> GPU-be79431d...)"]
    assert run_differences(run("2.11.0", "580.1", 64, uuid=""), baseline) == []  # one side did not record it
    # a GPU key does not carry the host CPU's vector tier: a host with other vector instructions is named
    amx, avx2 = run("2.11.0", "580.1", 64), run("2.11.0", "580.1", 64)
    amx.hardware.update(cpu_isa="amx", cpu_vector_flags=["avx2", "avx512f", "amx_tile"])
    avx2.hardware.update(cpu_isa="avx2", cpu_vector_flags=["avx2"])
    assert run_differences(amx, avx2) == [
        "cpu_isa avx2 -> amx", "cpu_vector_flags ['avx2'] -> ['avx2', 'avx512f', 'amx_tile']"]
