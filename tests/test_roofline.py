"""Roofline efficiency: bandwidth from the data sheet or NVML, weight bytes measured or from the architecture."""

import pytest

from harness.figure import Figure
from harness.models import arch_config
from harness.results import CellResult
from harness.roofline import bandwidth, dense_parameters, efficiency, weights_bytes


def test_bandwidth_comes_from_the_data_sheet_then_nvml():
    assert bandwidth({"name": "NVIDIA H200"})[0] == 4.8e12
    assert bandwidth({"name": "NVIDIA H100 80GB HBM3"})[0] == 3.35e12
    assert bandwidth({"name": "NVIDIA A100-SXM4-40GB"})[0] == 1.555e12  # not the A10's 600 GB/s
    value, source = bandwidth({"name": "Future GPU", "max_memory_clock_mhz": 1000, "memory_bus_width_bits": 512})
    assert value == 1000e6 * 2 * 64 and source.startswith("NVML")
    assert bandwidth({"name": "Future GPU"}) is None and bandwidth(None) is None


@pytest.mark.parametrize(("arch", "billions"), [("llama-2-7b", 6.738), ("tinyllama-1.1b", 1.100)])
def test_dense_parameters_match_the_published_counts(arch, billions):
    assert dense_parameters(arch_config(arch)) / 1e9 == pytest.approx(billions, abs=0.001)


def cells(decode, batch, details=None, backend="torch", dtype="float16"):
    common = {"method": "m", "model": "llama-2-7b-arch", "config": {"method": {"backend": backend,
              "params": {"dtype": dtype}}}, "hardware": {"gpu": {"name": "NVIDIA H200"}}}
    model_cell = CellResult(batch_size=None, details={"model": {"arch": "llama-2-7b"}, **(details or {})}, **common)
    cell = CellResult(batch_size=batch, figures={"decode_tokens_per_s": Figure(decode)}, **common)
    return cell, model_cell


def test_efficiency_is_weight_traffic_over_bandwidth():
    cell, model_cell = cells(decode=8 * 100.0, batch=8, details={"weights_bytes": 4.8e9})
    assert efficiency(cell, model_cell) == pytest.approx(100 * 4.8e9 / 4.8e12)  # 100 steps/s read 4.8 GB each


def test_unquantized_weights_are_derived_from_the_architecture_when_not_recorded():
    cell, model_cell = cells(decode=139.0, batch=1)
    size, source = weights_bytes(model_cell)
    assert size == dense_parameters(arch_config("llama-2-7b")) * 2 and "float16" in source
    assert efficiency(cell, model_cell) == pytest.approx(139.0 * size / 4.8e12)


def test_quantized_weights_without_a_record_give_no_figure():
    cell, model_cell = cells(decode=100.0, batch=1, backend="bnb")
    assert weights_bytes(model_cell) is None and efficiency(cell, model_cell) is None


def test_a_measured_bandwidth_replaces_the_data_sheet():
    cell, model_cell = cells(decode=8 * 100.0, batch=8, details={"weights_bytes": 4.8e9})
    assert efficiency(cell, model_cell, (4.0e12, "measured")) == pytest.approx(100 * 4.8e9 / 4.0e12)


def test_bandwidth_is_measured_stored_and_read_back(tmp_path):
    from harness.measure.bandwidth import measure_bandwidth, read_bandwidth, write_bandwidth

    measured = measure_bandwidth("cpu", size_mib=4, warmup=1, repeats=3)
    assert measured["bytes_per_s"] > 0 and len(measured["samples_bytes_per_s"]) == 3
    assert min(measured["samples_bytes_per_s"]) <= measured["bytes_per_s"] <= max(measured["samples_bytes_per_s"])
    assert read_bandwidth(tmp_path, "cpu-test") is None
    path = write_bandwidth(tmp_path, "cpu-test", measured, {}, {})
    assert path == tmp_path / "cpu-test" / "hardware" / "memory-bandwidth.json"
    value, source = read_bandwidth(tmp_path, "cpu-test")
    assert value == measured["bytes_per_s"] and str(path) in source
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_bandwidth("cpu", size_mib=4, repeats=0)


@pytest.mark.parametrize(("text", "field"), [("{", "not valid JSON"), ('{"schema_version": 9}', "schema_version"),
                                              ('{"schema_version": 1, "bytes_per_s": -1}', "bytes_per_s")])
def test_a_bad_bandwidth_file_is_named(tmp_path, text, field):
    from harness.measure.bandwidth import BandwidthError, read_bandwidth

    path = tmp_path / "k" / "hardware" / "memory-bandwidth.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(BandwidthError, match=field) as info:
        read_bandwidth(tmp_path, "k")
    assert str(path) in str(info.value)


def test_the_report_divides_by_the_stored_bandwidth(tmp_path):
    from harness.baselines import BaselineStore
    from harness.measure.bandwidth import write_bandwidth
    from harness.report import write_report

    cell, model_cell = cells(decode=8 * 100.0, batch=8, details={"weights_bytes": 4.8e9})
    cell.figures["peak_vram_mib"] = Figure(1000.0)
    store = BaselineStore(tmp_path / "baselines")
    store.merge("nvidia-h200-140gb", [cell, model_cell])
    write_bandwidth(store.root, "nvidia-h200-140gb", {"bytes_per_s": 4.0e12}, {}, {})
    text = write_report(store, ["nvidia-h200-140gb"], tmp_path / "out")[0].read_text()
    assert "12.0%" in text and "measured copy (4000 GB/s" in text  # 100 steps/s x 4.8 GB over 4 TB/s


def test_the_device_figure_is_what_the_roofline_share_divides_when_the_cell_has_it():
    cell, model_cell = cells(decode=8 * 100.0, batch=8, details={"weights_bytes": 4.8e9})
    cell.figures["decode_device_tokens_per_s"] = Figure(8 * 150.0)
    assert efficiency(cell, model_cell) == pytest.approx(150 * 4.8e9 / 4.8e12)
    assert efficiency(cell, model_cell, figure="decode_tokens_per_s") == pytest.approx(100 * 4.8e9 / 4.8e12)


def test_the_report_compares_one_memory_figure_across_backends(tmp_path):
    """llama.cpp's VRAM is invisible to torch's counters: the table takes NVML's figure, which every backend has."""
    from harness.baselines import BaselineStore
    from harness.report import write_report

    torch_cell, model_cell = cells(decode=8 * 100.0, batch=8, details={"weights_bytes": 4.8e9})
    torch_cell.figures.update(peak_vram_mib=Figure(1000.0), peak_nvml_mib=Figure(1500.0),
                              decode_device_tokens_per_s=Figure(8 * 150.0))
    gguf_cell = CellResult("q4", "llama-2-7b-arch", 8, figures={"decode_tokens_per_s": Figure(400.0),
                           "peak_nvml_mib": Figure(5400.0), "peak_rss_mib": Figure(700.0)},
                           hardware={"gpu": {"name": "NVIDIA H200"}})
    store = BaselineStore(tmp_path / "baselines")
    store.merge("nvidia-h200-140gb", [torch_cell, model_cell, gguf_cell])
    text = write_report(store, ["nvidia-h200-140gb"], tmp_path / "out")[0].read_text()
    assert "peak_nvml_mib b8" in text and "| 1500 |" in text and "| 5400 |" in text
    assert "device decode b8" in text and "15.0%" in text  # 150 steps/s x 4.8 GB over the data sheet's 4.8 TB/s
