"""Matrix parsing: the shipped file is valid, narrowing works, and every mistake names file and field."""

from pathlib import Path

import pytest

from harness.config import MatrixError, cell_id, parse_cell_id
from harness.matrix import load_matrix, parse_matrix

SHIPPED = Path(__file__).parent.parent / "benchmarks" / "matrix.toml"

MINIMAL = """
[models.tiny]
source = "synthetic"
arch = "tiny-test"
[methods.fp32]
backend = "torch"
dtype = "float32"
[suites.cpu]
models = ["tiny"]
methods = ["fp32"]
batch_sizes = [1, 4]
"""


def write(tmp_path, text):
    path = tmp_path / "matrix.toml"
    path.write_text(text)
    return path


def test_the_shipped_matrix_is_valid_and_covers_both_suites():
    matrix = load_matrix(SHIPPED)
    assert set(matrix.suites) >= {"cpu", "gpu"}
    gpu = matrix.suites["gpu"]
    assert gpu.device == "cuda"
    assert {"tinyllama-1.1b-arch", "llama-2-7b-arch"} <= set(gpu.models)
    assert gpu.batch_sizes == (1, 8, 32)
    assert matrix.suites["cpu"].models == ("embedded",)


def test_suite_run_settings_override_the_shared_ones():
    matrix = load_matrix(SHIPPED)
    assert matrix.suites["cpu"].run.new_tokens == 32
    assert matrix.suites["gpu"].run.new_tokens == 64
    assert matrix.suites["cpu"].tolerances["decode_tokens_per_s"] == 0.5


def test_narrowing_by_model_method_and_batch_size():
    matrix = load_matrix(SHIPPED)
    cells = matrix.cells(models=["llama-2-7b-arch"], methods=["bnb-nf4"], batch_sizes=[8])
    assert [(c.method.name, c.model.name, c.batch_sizes) for c in cells] == [("bnb-nf4", "llama-2-7b-arch", (8,))]


def test_narrowing_by_an_unknown_name_says_which_names_exist():
    matrix = load_matrix(SHIPPED)
    with pytest.raises(MatrixError, match=r"--methods: unknown name\(s\) bnb-nf5 .* known: .*bnb-nf4"):
        matrix.cells(methods=["bnb-nf5"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('arch = "tiny-test"', 'arch = "tiny-test"\ncolour = "red"'),
         r"models\.tiny\.colour: unknown field"),
        (lambda t: t.replace('source = "synthetic"', 'source = "ftp"'), r"models\.tiny\.source: expected one of"),
        (lambda t: t.replace('arch = "tiny-test"\n', ""), r"models\.tiny\.arch: required for a synthetic model"),
        (lambda t: t.replace('backend = "torch"', 'backend = "tensorrt"'),
         r"methods\.fp32\.backend: unknown backend 'tensorrt'"),
        (lambda t: t.replace('dtype = "float32"', 'dtype = "float8"'), r"methods\.fp32\.dtype: expected one of"),
        (lambda t: t.replace('dtype = "float32"', 'dtype = "float32"\nbits = 4'),
         r"methods\.fp32\.bits: unknown parameter of backend 'torch'"),
        (lambda t: t.replace('methods = ["fp32"]', 'methods = ["fp16"]'),
         r"suites\.cpu\.methods\[0\]: unknown method 'fp16'"),
        (lambda t: t.replace("batch_sizes = [1, 4]", "batch_sizes = [1, 0]"),
         r"suites\.cpu\.batch_sizes\[1\]: must be at least 1"),
        (lambda t: t.replace("batch_sizes = [1, 4]", 'batch_sizes = [1, "8"]'),
         r"suites\.cpu\.batch_sizes\[1\]: expected int"),
        (lambda t: "[run]\nnew_tokens = -3\n" + t, r"run\.new_tokens: must be positive"),
        (lambda t: "[run]\nrepeats = true\n" + t, r"run\.repeats: expected int"),
        (lambda t: "[run]\nprocesses = 0\n" + t, r"run\.processes: must be positive"),
        (lambda t: "[tolerances]\ndecode_tokens_per_s = -0.1\n" + t, r"tolerances"),
        (lambda t: "[tolerances]\nspeed = 0.1\n" + t, r"speed"),
        (lambda t: t + "\n[suites.cpu.tolerances.methods.nope]\nppl = 0.1\n", r"methods\.nope: unknown method"),
        (lambda t: t + "\n[extras]\n", r"extras: unknown table"),
        (lambda t: t.replace("[suites.cpu]", '[suites.cpu]\nreference = "fp64"'),
         r"suites\.cpu\.reference: unknown method 'fp64'"),
        (lambda t: t.replace("[suites.cpu]", "[suites.cpu]\ndevice = \"tpu\""), r"suites\.cpu\.device"),
        (lambda t: "[accuracy]\ntext = 3\n" + t, r"accuracy\.text: expected str"),
        (lambda t: "[eval]\nlimit = -1\n" + t, r"eval\.limit: must be 0 or more"),
    ],
)
def test_bad_input_names_the_file_and_field(tmp_path, edit, message):
    path = write(tmp_path, edit(MINIMAL))
    with pytest.raises(MatrixError, match=message) as info:
        load_matrix(path)
    assert str(path) in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(MatrixError, match="not valid TOML"):
        load_matrix(write(tmp_path, "[models\n"))
    with pytest.raises(MatrixError, match="matrix file not found"):
        load_matrix(tmp_path / "nope.toml")


def test_a_matrix_without_suites_is_refused():
    with pytest.raises(MatrixError, match="at least one suite"):
        parse_matrix({"models": {}}, "inline")


def test_the_evaluation_text_is_a_string_setting(tmp_path):
    matrix = load_matrix(write(tmp_path, '[accuracy]\ntext = "datasets:wikitext:wikitext-2-raw-v1:test"\n' + MINIMAL))
    assert matrix.suites["cpu"].accuracy.text == "datasets:wikitext:wikitext-2-raw-v1:test"
    assert load_matrix(write(tmp_path, MINIMAL)).suites["cpu"].accuracy.text is None  # the held-out corpus text


@pytest.mark.parametrize("method, model, batch_size", [("fp16", "tinyllama-1.1b-arch", 8), ("gguf-q4_0", "m", None)])
def test_a_cell_id_reads_back(method, model, batch_size):
    assert parse_cell_id(cell_id(method, model, batch_size)) == (method, model, batch_size)


@pytest.mark.parametrize("text", ["fp16", "fp16|", "fp16|m|8", "fp16|m|bx", "fp16|m|b1|x", "|m|b1"])
def test_a_text_that_is_no_cell_id_is_named(text):
    with pytest.raises(ValueError, match=r"expected METHOD\|MODEL or METHOD\|MODEL\|bN") as error:
        parse_cell_id(text)
    assert repr(text) in str(error.value)
